#pragma once
/// @file version.hpp
/// The procpool version, the single place it is defined (CMake reads it from here).

/// The major version: it changes when the API breaks (SemVer).
#define PROCPOOL_VERSION_MAJOR 0
/// The minor version: it changes when features are added compatibly.
#define PROCPOOL_VERSION_MINOR 1
/// The patch version: it changes for compatible fixes.
#define PROCPOOL_VERSION_PATCH 0

namespace procpool {
/// The version as a number: major * 10000 + minor * 100 + patch.
inline constexpr int version = PROCPOOL_VERSION_MAJOR * 10000 + PROCPOOL_VERSION_MINOR * 100 + PROCPOOL_VERSION_PATCH;
}  // namespace procpool
