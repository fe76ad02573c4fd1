# Lets find_package(Torch) succeed with no CMAKE_PREFIX_PATH: asks the Python interpreter on PATH (or
# Python_EXECUTABLE) where its torch wheel keeps TorchConfig.cmake.
if(NOT Torch_DIR)
  find_package(Python COMPONENTS Interpreter)
  if(Python_Interpreter_FOUND)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c "import torch.utils; print(torch.utils.cmake_prefix_path)"
      OUTPUT_VARIABLE _fa2_torch_prefix
      OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE _fa2_torch_result
      ERROR_QUIET)
    if(_fa2_torch_result EQUAL 0 AND _fa2_torch_prefix)
      list(APPEND CMAKE_PREFIX_PATH "${_fa2_torch_prefix}")
      message(STATUS "flash_attn2: using Torch from ${_fa2_torch_prefix}")
    endif()
  endif()
endif()
