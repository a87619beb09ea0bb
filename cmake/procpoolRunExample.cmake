# Runs examples and checks their output (see examples/CMakeLists.txt for the expectation files).
#
#   cmake -DNAME=<name> -DEXE=<program> -DEXPECTED_DIR=<dir> -DOUTPUT_DIR=<dir> [-DTIMEOUT=<s>]
#         -P procpoolRunExample.cmake
#       One example, for its ctest test: fails unless it exits 0 and its stdout matches
#       EXPECTED_DIR/<name>.txt (exactly) or EXPECTED_DIR/<name>.regex, when either exists.
#   cmake -DMANIFEST=<file> -DEXPECTED_DIR=<dir> -DOUTPUT_DIR=<dir> -P procpoolRunExample.cmake
#       Every example listed in MANIFEST (set(EXAMPLES <name> <program> ...)), one after another,
#       each under a header with its output; fails at the end if any one failed.
#
# Each program's stdout and stderr are kept in OUTPUT_DIR/<name>.stdout and .stderr.
cmake_minimum_required(VERSION 3.25)

if(NOT DEFINED TIMEOUT)
  set(TIMEOUT 300)
endif()
find_program(_diff diff)

# Runs one example; sets <ok_var> to TRUE or FALSE and prints why it failed.
function(run_example name exe ok_var)
  set(${ok_var} FALSE PARENT_SCOPE)
  file(MAKE_DIRECTORY "${OUTPUT_DIR}")
  set(_stdout "${OUTPUT_DIR}/${name}.stdout")
  set(_stderr "${OUTPUT_DIR}/${name}.stderr")
  if(NOT EXISTS "${exe}")
    message("FAILED ${name}: ${exe} does not exist (not built?)")
    return()
  endif()
  execute_process(COMMAND "${exe}"
                  INPUT_FILE /dev/null
                  OUTPUT_FILE "${_stdout}"
                  ERROR_FILE "${_stderr}"
                  TIMEOUT ${TIMEOUT}
                  RESULT_VARIABLE _result)
  # Show what the program printed, stdout first, byte for byte.
  execute_process(COMMAND "${CMAKE_COMMAND}" -E cat "${_stdout}")
  file(READ "${_stderr}" _err)
  if(NOT _err STREQUAL "")
    message("---- ${name}: stderr ----\n${_err}")
  endif()

  if(NOT _result STREQUAL "0")
    message("FAILED ${name}: exit status ${_result}")
    return()
  endif()
  set(_expected_txt "${EXPECTED_DIR}/${name}.txt")
  set(_expected_regex "${EXPECTED_DIR}/${name}.regex")
  if(EXISTS "${_expected_txt}")
    execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${_expected_txt}" "${_stdout}"
                    RESULT_VARIABLE _differs OUTPUT_QUIET ERROR_QUIET)
    if(NOT _differs EQUAL 0)
      message("FAILED ${name}: stdout differs from ${_expected_txt}")
      if(_diff)
        execute_process(COMMAND "${_diff}" -u --label expected --label actual
                                "${_expected_txt}" "${_stdout}")
      else()
        file(READ "${_expected_txt}" _want)
        message("---- expected ----\n${_want}---- end ----")
      endif()
      return()
    endif()
  elseif(EXISTS "${_expected_regex}")
    file(READ "${_expected_regex}" _regex)
    string(REGEX REPLACE "\r?\n$" "" _regex "${_regex}")
    file(READ "${_stdout}" _out)
    if(NOT _out MATCHES "${_regex}")
      message("FAILED ${name}: stdout does not match the regex in ${_expected_regex}:\n${_regex}")
      return()
    endif()
  endif()
  set(${ok_var} TRUE PARENT_SCOPE)
endfunction()

if(DEFINED MANIFEST)
  include("${MANIFEST}")
  set(_failed "")
  set(_count 0)
  while(EXAMPLES)
    list(POP_FRONT EXAMPLES _name _exe)
    math(EXPR _count "${_count} + 1")
    message("\n==================== ${_name} ====================")
    run_example("${_name}" "${_exe}" _ok)
    if(NOT _ok)
      list(APPEND _failed "${_name}")
    endif()
  endwhile()
  list(LENGTH _failed _nfailed)
  math(EXPR _npassed "${_count} - ${_nfailed}")
  message("\nexamples: ${_npassed} passed, ${_nfailed} failed")
  if(_failed)
    list(JOIN _failed ", " _failed)
    message(FATAL_ERROR "failed examples: ${_failed}")
  endif()
else()
  foreach(_var IN ITEMS NAME EXE EXPECTED_DIR OUTPUT_DIR)
    if(NOT DEFINED ${_var})
      message(FATAL_ERROR "procpoolRunExample.cmake: -D${_var}=... is required")
    endif()
  endforeach()
  run_example("${NAME}" "${EXE}" _ok)
  if(NOT _ok)
    message(FATAL_ERROR "example ${NAME} failed")
  endif()
endif()
