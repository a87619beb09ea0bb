#pragma once
/// @file procpool.hpp
/// Everything in procpool: `#include <procpool/procpool.hpp>`.
/// Each part also has its own header, for code that wants only that part.

/// @namespace procpool
/// Python's multiprocessing for C++: everything procpool offers is here. The internals, in
/// procpool::detail, are not part of the API and may change in any release.

#include "async_result.hpp"
#include "connection.hpp"
#include "errors.hpp"
#include "manager.hpp"
#include "pool.hpp"
#include "process.hpp"
#include "progress.hpp"
#include "queue.hpp"
#include "serialize.hpp"
#include "shared_memory.hpp"
#include "synchronize.hpp"
#include "thread_pool.hpp"
#include "version.hpp"
