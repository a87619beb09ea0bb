#pragma once
/// @file errors.hpp
/// Every error procpool throws. All derive from procpool::Error, itself a std::runtime_error,
/// so `catch (const procpool::Error&)` catches everything procpool reports about processes,
/// messages and tasks, while misuse (a call in the wrong state) is a std::logic_error.

// Every public header includes this one, so this is the first thing a C++17 build reports.
#if __cplusplus < 202002L
#error "procpool needs C++20: compile with -std=c++20 (or link the CMake target procpool::procpool, which asks for it)"
#endif

#include <sys/types.h>

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace procpool {

/// The base of every procpool error. Constructed from a message, as std::runtime_error is;
/// each error below that declares no constructor of its own takes the same message argument.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A wait with a time limit (`get(t)`, `next(t)`) ran out of time; the awaited work goes on
/// (Python's multiprocessing.TimeoutError).
class TimeoutError : public Error {
 public:
  using Error::Error;
  /// An error with the message "procpool: timed out".
  TimeoutError() : Error("procpool: timed out") {}
};

/// A task ran longer than PoolOptions::task_timeout; its worker was killed and replaced.
class TaskTimeoutError : public Error {
 public:
  using Error::Error;
};

/// The worker process running a task died (a signal, `_exit`, an out-of-memory kill).
class WorkerLostError : public Error {
 public:
  /// `what` is the full message, e.g. "worker 1234 died: killed by signal 9 (SIGKILL)".
  WorkerLostError(pid_t pid, std::optional<int> signal, std::optional<int> exit_status,
                  const std::string& what)
      : Error(what), pid_(pid), signal_(signal), exit_status_(exit_status) {}

  /// The pid of the worker that died.
  pid_t pid() const noexcept { return pid_; }
  /// The signal that killed it, if a signal did.
  std::optional<int> signal() const noexcept { return signal_; }
  /// Its exit status, if it exited.
  std::optional<int> exit_status() const noexcept { return exit_status_; }

 private:
  pid_t pid_;
  std::optional<int> signal_;
  std::optional<int> exit_status_;
};

/// A task was submitted to a pool after close() or terminate().
class PoolNotRunningError : public Error {
 public:
  using Error::Error;
};

/// The result was still pending when the pool was terminated.
class PoolTerminatedError : public Error {
 public:
  using Error::Error;
};

/// Thrown by get() on a result that was cancelled.
class CancelledError : public Error {
 public:
  using Error::Error;
};

/// A task threw an exception of a type that cannot be rebuilt in the parent.
/// what() is the exception's message; type_name() its demangled dynamic type.
///
/// A task's exception crosses back from a worker process as itself (same type, same message)
/// when its dynamic type is exactly one of std::runtime_error, std::logic_error,
/// std::invalid_argument, std::out_of_range, std::domain_error, std::length_error,
/// std::range_error, std::overflow_error, std::underflow_error or std::bad_alloc. Any other
/// type, a derived one such as std::system_error, procpool's own errors or `throw 42`, arrives
/// as a RemoteError. (A ThreadPool task's exception is passed on unchanged.)
class RemoteError : public Error {
 public:
  /// An error for an exception of type `type_name` whose message was `what`.
  RemoteError(std::string type_name, const std::string& what)
      : Error(what), type_name_(std::move(type_name)) {}
  /// The demangled name of the exception's dynamic type, e.g. "std::system_error" or "int".
  std::string type_name() const { return type_name_; }

 private:
  std::string type_name_;
};

/// A corrupt, truncated, oversized or mistyped message.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

/// The other end of a Connection closed and no message is left (Python's EOFError from
/// `conn.recv()`).
class EOFError : public Error {
 public:
  using Error::Error;
};

/// Connection::recv_bytes_into() got a message larger than the buffer; the whole message is in
/// message() (Python's multiprocessing.BufferTooShort).
class BufferTooShortError : public Error {
 public:
  /// An error carrying the whole `message` that did not fit, with the text `what`.
  BufferTooShortError(std::vector<std::byte> message, const std::string& what)
      : Error(what), message_(std::move(message)) {}
  /// The whole message that did not fit (it has been consumed from the connection).
  const std::vector<std::byte>& message() const noexcept { return message_; }

 private:
  std::vector<std::byte> message_;
};

/// A queue get timed out or a get_nowait found nothing (Python's queue.Empty).
class Empty : public Error {
 public:
  using Error::Error;
  /// An error with the message "procpool: queue is empty".
  Empty() : Error("procpool: queue is empty") {}
};

/// A queue put timed out or a put_nowait found no room (Python's queue.Full).
class Full : public Error {
 public:
  using Error::Error;
  /// An error with the message "procpool: queue is full".
  Full() : Error("procpool: queue is full") {}
};

/// A Barrier was aborted, or broken by a timeout, while or before this process waited
/// (Python's threading.BrokenBarrierError).
class BrokenBarrierError : public Error {
 public:
  using Error::Error;
};

/// The process that held a Lock or RLock died holding it. The lock is not held by the caller
/// and is usable again; the data it protected may be inconsistent.
class OwnerDiedError : public Error {
 public:
  using Error::Error;
};

/// A Manager request could not be served because the manager's server is gone: the Manager was
/// shut down, its server was killed, or the program that started it exited.
class ManagerError : public Error {
 public:
  using Error::Error;
};

}  // namespace procpool
