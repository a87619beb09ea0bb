#pragma once
/// @file procpool.hpp
/// Everything in procpool: `#include <procpool/procpool.hpp>`.
/// Each part also has its own header, for code that wants only that part.

#include "async_result.hpp"
#include "connection.hpp"
#include "errors.hpp"
#include "manager.hpp"
#include "pool.hpp"
#include "process.hpp"
#include "queue.hpp"
#include "serialize.hpp"
#include "shared_memory.hpp"
#include "synchronize.hpp"
#include "thread_pool.hpp"
#include "version.hpp"
