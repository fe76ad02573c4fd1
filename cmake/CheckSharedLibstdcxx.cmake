# Refuses a C++ toolchain that links libstdc++ statically into shared objects (as some self-built GCCs do by
# default, e.g. the lent GPU machines' /opt/gcc): our library would then carry a second C++ runtime beside the
# one Python's / LibTorch's process already has, and error messages crash when they cross between the two.
# Builds a one-function shared object with the configured compiler and reads its NEEDED entries.
# FLASH_ATTN2_ALLOW_STATIC_LIBSTDCXX=ON skips the check.
option(FLASH_ATTN2_ALLOW_STATIC_LIBSTDCXX "Build even if the C++ compiler links libstdc++ statically into shared objects" OFF)

function(flash_attn2_check_shared_libstdcxx)
  if(FLASH_ATTN2_ALLOW_STATIC_LIBSTDCXX OR NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    return()
  endif()
  find_program(_fa2_readelf readelf)
  if(NOT _fa2_readelf)
    message(STATUS "flash_attn2: no readelf, libstdc++ linkage of shared objects not checked")
    return()
  endif()
  set(_dir "${CMAKE_BINARY_DIR}/CMakeFiles/fa2_libstdcxx_check")
  file(MAKE_DIRECTORY "${_dir}")
  file(WRITE "${_dir}/probe.cpp" "#include <string>\nstd::string fa2_probe(int i) { return std::to_string(i); }\n")
  execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -shared -fPIC "${_dir}/probe.cpp" -o "${_dir}/probe.so"
                  RESULT_VARIABLE _rc OUTPUT_QUIET ERROR_VARIABLE _err)
  if(NOT _rc EQUAL 0)
    message(STATUS "flash_attn2: could not build the libstdc++ probe (${_err}); linkage not checked")
    return()
  endif()
  execute_process(COMMAND "${_fa2_readelf}" -d "${_dir}/probe.so" OUTPUT_VARIABLE _dyn)
  if(NOT _dyn MATCHES "libstdc\\+\\+")
    message(FATAL_ERROR
      "flash_attn2: the C++ compiler ${CMAKE_CXX_COMPILER} links libstdc++ statically into shared objects "
      "(a probe library built with it has no libstdc++ in its NEEDED entries). The operator library would then "
      "carry its own C++ runtime beside the one of the Python / LibTorch process, and its error messages crash "
      "there. Configure with a compiler that links it dynamically, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++ "
      "CUDAHOSTCXX=/usr/bin/g++ (or -DCMAKE_CXX_COMPILER=/usr/bin/g++ -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++), "
      "or pass -DFLASH_ATTN2_ALLOW_STATIC_LIBSTDCXX=ON to build anyway.")
  endif()
  message(STATUS "flash_attn2: ${CMAKE_CXX_COMPILER} links libstdc++ dynamically into shared objects")
endfunction()

flash_attn2_check_shared_libstdcxx()
