# Drives the consumer tests registered by tests/CMakeLists.txt.
#
#   -DMODE=install  -DBUILD_TREE=<procpool build> -DPREFIX=<dir> [-DCONFIG=<cfg>]
#       Wipes PREFIX and runs `cmake --install BUILD_TREE --prefix PREFIX` (the ctest fixture).
#   -DMODE=consumer -DSOURCE=<project> -DBINARY=<dir> -DGENERATOR=... -DMAKE_PROGRAM=...
#                   -DCXX_COMPILER=... [-DCXX_FLAGS=...] [-DCONFIG=<cfg>]
#                   [-DPREFIX=<install prefix>] [-DPROCPOOL_SOURCE_DIR=<procpool source>]
#       Configures SOURCE in a fresh BINARY with the same generator and compiler as procpool's
#       build, builds it, and runs its executable `consumer`, which must exit 0. With PREFIX, the
#       consumer must find procpool there and nowhere else.
cmake_minimum_required(VERSION 3.25)

function(run)
  string(REPLACE ";" " " _line "${ARGN}")
  message(STATUS "running: ${_line}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _result)
  if(NOT _result EQUAL 0)
    message(FATAL_ERROR "failed (${_result}): ${_line}")
  endif()
endfunction()

if(MODE STREQUAL "install")
  file(REMOVE_RECURSE "${PREFIX}")
  set(_config_args "")
  if(CONFIG)
    set(_config_args --config "${CONFIG}")
  endif()
  run("${CMAKE_COMMAND}" --install "${BUILD_TREE}" --prefix "${PREFIX}" ${_config_args})
  file(GLOB_RECURSE _config_files "${PREFIX}/*/procpoolConfig.cmake")
  if(NOT _config_files OR NOT EXISTS "${PREFIX}/include/procpool/version.hpp")
    message(FATAL_ERROR "the install into ${PREFIX} lacks procpoolConfig.cmake or the headers")
  endif()

elseif(MODE STREQUAL "consumer")
  file(REMOVE_RECURSE "${BINARY}")
  set(_args -S "${SOURCE}" -B "${BINARY}" -G "${GENERATOR}"
            "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}")
  if(MAKE_PROGRAM)
    list(APPEND _args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  if(CONFIG)
    list(APPEND _args "-DCMAKE_BUILD_TYPE=${CONFIG}")
  endif()
  if(PREFIX)
    # Only the staged install may satisfy find_package(procpool), not a registry or a system copy.
    list(APPEND _args "-DCMAKE_PREFIX_PATH=${PREFIX}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
                      -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
  endif()
  if(PROCPOOL_SOURCE_DIR)
    list(APPEND _args "-DPROCPOOL_SOURCE_DIR=${PROCPOOL_SOURCE_DIR}")
  endif()
  run("${CMAKE_COMMAND}" ${_args})
  if(PREFIX)
    file(STRINGS "${BINARY}/CMakeCache.txt" _found REGEX "^procpool_DIR:")
    string(REGEX REPLACE "^procpool_DIR:[A-Z]+=" "" _found "${_found}")
    file(REAL_PATH "${PREFIX}" _prefix)
    file(REAL_PATH "${_found}" _found_real)
    string(FIND "${_found_real}/" "${_prefix}/" _at)
    if(NOT _at EQUAL 0)
      message(FATAL_ERROR "find_package(procpool) used ${_found}, not the staged install in "
                          "${PREFIX}")
    endif()
    message(STATUS "find_package(procpool) used ${_found}")
  endif()
  set(_build_args "")
  if(CONFIG)
    set(_build_args --config "${CONFIG}")
  endif()
  run("${CMAKE_COMMAND}" --build "${BINARY}" ${_build_args})
  set(_exe "${BINARY}/consumer")
  if(NOT EXISTS "${_exe}")
    set(_exe "${BINARY}/${CONFIG}/consumer")  # multi-config generators
  endif()
  if(NOT EXISTS "${_exe}")
    message(FATAL_ERROR "the consumer build produced no executable named consumer in ${BINARY}")
  endif()
  run("${_exe}")

else()
  message(FATAL_ERROR "procpoolConsumerTest.cmake: MODE must be install or consumer")
endif()
