# Build settings for procpool's own tests, examples, benchmarks and fuzzers (never for consumers
# of the library): warnings as errors, optional sanitizers, strict C++20.
#
#   procpool_add_development_target(<target> [NO_SANITIZE])
#     Links <target> to procpool::procpool and gives it -Wall -Wextra -Wpedantic (-Werror unless
#     PROCPOOL_WERROR is OFF), -std=c++20 without GNU extensions and, unless NO_SANITIZE, the
#     sanitizers named in PROCPOOL_SANITIZE.
include_guard(GLOBAL)
include(CheckCXXSourceCompiles)

add_library(procpool_warnings INTERFACE)
target_compile_options(procpool_warnings INTERFACE -Wall -Wextra -Wpedantic)
if(PROCPOOL_WERROR)
  target_compile_options(procpool_warnings INTERFACE -Werror)
endif()

add_library(procpool_sanitizers INTERFACE)
string(STRIP "${PROCPOOL_SANITIZE}" _procpool_sanitize)
if(NOT _procpool_sanitize STREQUAL "")
  if(NOT _procpool_sanitize MATCHES "^[a-z_-]+(,[a-z_-]+)*$")
    message(FATAL_ERROR "procpool: PROCPOOL_SANITIZE='${PROCPOOL_SANITIZE}' is not a comma-separated "
                        "list of sanitizers such as 'address,undefined' or 'thread'")
  endif()
  set(_procpool_sanitize_flags
      -fsanitize=${_procpool_sanitize} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  # Fail here, with a clear message, rather than in the middle of the build when the compiler or
  # its runtime library (libasan, libtsan, libubsan) cannot do what was asked.
  set(CMAKE_REQUIRED_FLAGS "${_procpool_sanitize_flags}")
  list(JOIN CMAKE_REQUIRED_FLAGS " " CMAKE_REQUIRED_FLAGS)
  set(CMAKE_REQUIRED_LINK_OPTIONS ${_procpool_sanitize_flags})
  set(CMAKE_REQUIRED_QUIET ON)
  string(MAKE_C_IDENTIFIER "PROCPOOL_SANITIZE_${_procpool_sanitize}_WORKS" _procpool_check)
  check_cxx_source_compiles("int main() { return 0; }" ${_procpool_check})
  unset(CMAKE_REQUIRED_FLAGS)
  unset(CMAKE_REQUIRED_LINK_OPTIONS)
  unset(CMAKE_REQUIRED_QUIET)
  if(NOT ${_procpool_check})
    message(FATAL_ERROR "procpool: ${CMAKE_CXX_COMPILER} cannot build with "
                        "-fsanitize=${_procpool_sanitize} (PROCPOOL_SANITIZE); is its runtime "
                        "library installed?")
  endif()
  target_compile_options(procpool_sanitizers INTERFACE ${_procpool_sanitize_flags})
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC's manual: "sanitizers tend to increase the rate of false positive warnings, most notably
    # those around -Wmaybe-uninitialized" (GCC 12 reports them inside <regex>, which Catch2 uses).
    # Unsanitized builds keep the warning, and -Werror with it.
    target_compile_options(procpool_sanitizers INTERFACE -Wno-maybe-uninitialized)
  endif()
  target_link_options(procpool_sanitizers INTERFACE ${_procpool_sanitize_flags})
  message(STATUS "procpool: tests and examples use -fsanitize=${_procpool_sanitize}")
endif()

function(procpool_add_development_target target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "NO_SANITIZE" "" "")
  get_target_property(_type ${target} TYPE)
  if(_type STREQUAL "INTERFACE_LIBRARY")
    set(_scope INTERFACE)
  else()
    set(_scope PRIVATE)
  endif()
  target_link_libraries(${target} ${_scope} procpool::procpool procpool_warnings)
  if(NOT arg_NO_SANITIZE)
    target_link_libraries(${target} ${_scope} procpool_sanitizers)
  endif()
  set_target_properties(${target} PROPERTIES
    CXX_STANDARD 20
    CXX_STANDARD_REQUIRED ON
    CXX_EXTENSIONS OFF)
endfunction()
