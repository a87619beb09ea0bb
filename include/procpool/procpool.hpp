#pragma once
/// @file procpool.hpp
/// Everything in procpool: `#include <procpool/procpool.hpp>`.
/// Each part also has its own header, for code that wants only that part.

#include "connection.hpp"
#include "errors.hpp"
#include "process.hpp"
#include "serialize.hpp"
#include "version.hpp"
