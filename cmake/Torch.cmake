# Locates the installed torch from the Python that builds us.
#
# torch's own TorchConfig.cmake is not used on purpose: with a minimal CUDA toolkit (no cuBLAS,
# no nvrtc) its legacy FindCUDA path fails (see shared/BUILD-NOTES.md). Everything it would give us
# is asked of torch itself instead: include paths, library folder, C++ ABI, CUDA version.
#
# Sets: TORCH_VERSION, TORCH_CUDA_VERSION ("" for a CPU build), TORCH_INCLUDE_DIRS,
#       TORCH_LIBRARY_DIR, TORCH_CXX11_ABI, TORCH_NVIDIA_INCLUDE_DIR ("" when absent).

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, torch
from torch.utils import cpp_extension as ext
try:
    import nvidia
    nv = [os.path.join(p, "cu13", "include") for p in nvidia.__path__]
    nv = next((p for p in nv if os.path.isdir(p)), "")
except ImportError:
    nv = ""
print(torch.__version__.split("+")[0])
print(torch.version.cuda or "")
print(",".join(ext.include_paths("cuda" if torch.version.cuda else "cpu")))
print(os.path.join(os.path.dirname(torch.__file__), "lib"))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(nv)
]=]
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "lorakit: could not import torch from ${Python_EXECUTABLE}; install torch "
                      "first and build with `pip install --no-build-isolation .`")
endif()

string(REPLACE "\n" ";" _torch_lines "${_torch_info}")
list(GET _torch_lines 0 TORCH_VERSION)
list(GET _torch_lines 1 TORCH_CUDA_VERSION)
list(GET _torch_lines 2 _torch_includes)
list(GET _torch_lines 3 TORCH_LIBRARY_DIR)
list(GET _torch_lines 4 TORCH_CXX11_ABI)
list(LENGTH _torch_lines _n)
if(_n GREATER 5)
  list(GET _torch_lines 5 TORCH_NVIDIA_INCLUDE_DIR)
else()
  set(TORCH_NVIDIA_INCLUDE_DIR "")
endif()
string(REPLACE "," ";" TORCH_INCLUDE_DIRS "${_torch_includes}")

# One imported target per torch library we link.
foreach(_lib torch torch_cpu c10 torch_python torch_cuda c10_cuda)
  if(EXISTS "${TORCH_LIBRARY_DIR}/lib${_lib}.so")
    add_library(torch::${_lib} SHARED IMPORTED)
    set_target_properties(torch::${_lib} PROPERTIES IMPORTED_LOCATION
                                                    "${TORCH_LIBRARY_DIR}/lib${_lib}.so")
  endif()
endforeach()

message(STATUS "lorakit: torch ${TORCH_VERSION} (CUDA '${TORCH_CUDA_VERSION}'), "
               "C++11 ABI ${TORCH_CXX11_ABI}")
