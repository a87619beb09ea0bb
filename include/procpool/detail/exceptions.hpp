#pragma once
// Describing an exception as text (its demangled dynamic type and message), so that it can be
// printed by a child or carried back to the parent and rebuilt there.

#include <cxxabi.h>
#include <unistd.h>

#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <typeinfo>

#include "posix.hpp"

namespace procpool::detail {

/// The demangled name of a type_info ("std::runtime_error", "int").
inline std::string demangle(const std::type_info& t) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(
      abi::__cxa_demangle(t.name(), nullptr, nullptr, &status), std::free);
  return status == 0 && name ? std::string(name.get()) : std::string(t.name());
}

struct ExceptionText {
  std::string type_name;  // demangled dynamic type
  std::string message;    // what(), or a description for non-std::exception values
};

/// Describes an exception: its exact dynamic type and its message.
inline ExceptionText describe_exception(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return {demangle(typeid(ex)), ex.what()};
  } catch (...) {
    const std::type_info* t = abi::__cxa_current_exception_type();
    std::string name = t ? demangle(*t) : std::string("unknown");
    return {name, "an exception of type " + name + " (not derived from std::exception)"};
  }
}

/// Prints an exception that escaped a child's run() to stderr, as Python prints the traceback
/// of a Process that raised: "Process Process-1:" then "std::runtime_error: boom".
inline void report_uncaught(const std::string& process_name, std::exception_ptr e) noexcept {
  try {
    ExceptionText text = describe_exception(e);
    std::string out = "Process " + process_name + ":\n" + text.type_name + ": " + text.message +
                      "\n";
    const char* p = out.data();
    std::size_t left = out.size();
    while (left > 0) {
      // A signal handler may interrupt a write blocked on a full pipe: retry, or the report
      // is lost.
      ssize_t n = retry_eintr([&] { return ::write(STDERR_FILENO, p, left); });
      if (n <= 0) break;
      p += n;
      left -= static_cast<std::size_t>(n);
    }
  } catch (...) {
  }
}

}  // namespace procpool::detail
