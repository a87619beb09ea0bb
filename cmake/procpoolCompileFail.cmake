# Runs one compile-fail test (registered by tests/CMakeLists.txt):
#
#   cmake -DSOURCE=<tests/compile_fail/x.cpp> -DFLAGS_FILE=<generated flags> -P procpoolCompileFail.cmake
#
# The first line of SOURCE must be `// EXPECT: <regex>`. The file is compiled with -fsyntax-only,
# with the compiler, flags, include directories and C++ standard of a unit test. The test passes
# only if the compiler rejects the file AND its output (stdout and stderr together, C locale so
# quotes are plain ', no colours) matches <regex>. <regex> is a CMake regular expression searched
# anywhere in the output, for example:
#
#   // EXPECT: static assertion failed.*must be copyable
#
# Keep it specific: a file that fails for another reason (a typo, a missing include) must not pass.
cmake_minimum_required(VERSION 3.25)

foreach(_var IN ITEMS SOURCE FLAGS_FILE)
  if(NOT DEFINED ${_var})
    message(FATAL_ERROR "procpoolCompileFail.cmake: -D${_var}=... is required")
  endif()
endforeach()
include("${FLAGS_FILE}")  # sets PROCPOOL_CXX_COMPILER and PROCPOOL_CXX_ARGS

file(READ "${SOURCE}" _head LIMIT 4096)
string(REGEX MATCH "^[^\n]*" _first_line "${_head}")
string(REGEX REPLACE "\r$" "" _first_line "${_first_line}")
if(NOT _first_line MATCHES "^// EXPECT: *(.*[^ \t])[ \t]*$")
  message(FATAL_ERROR "${SOURCE}: the first line must be `// EXPECT: <regex>` "
                      "(the regex the compiler's error output must match), not:\n${_first_line}")
endif()
set(_expect "${CMAKE_MATCH_1}")

set(_command "${PROCPOOL_CXX_COMPILER}" ${PROCPOOL_CXX_ARGS} -fsyntax-only
             -fdiagnostics-color=never "${SOURCE}")
list(REMOVE_ITEM _command "")
list(JOIN _command " " _command_line)
execute_process(
  COMMAND "${CMAKE_COMMAND}" -E env LC_ALL=C LANG=C LANGUAGE= ${_command}
  RESULT_VARIABLE _result
  OUTPUT_VARIABLE _output
  ERROR_VARIABLE _output)

# Details go out with message(NOTICE), which prints them as they are; FATAL_ERROR would reflow.
if(_result EQUAL 0)
  message(NOTICE "command: ${_command_line}\n${_output}")
  message(FATAL_ERROR "${SOURCE} compiled, but it must be rejected with an error matching: "
                      "${_expect}")
endif()
if(NOT _result MATCHES "^[0-9]+$")
  message(NOTICE "command: ${_command_line}")
  message(FATAL_ERROR "could not run the compiler: ${_result}")
endif()
if(NOT _output MATCHES "${_expect}")
  message(NOTICE "command: ${_command_line}\n---- compiler output ----\n${_output}---- end ----")
  message(FATAL_ERROR "${SOURCE} was rejected, but its error output (above) does not match: "
                      "${_expect}")
endif()
message(STATUS "${SOURCE} was rejected as expected (matched: ${_expect})")
