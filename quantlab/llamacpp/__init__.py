"""llama.cpp, in one package: the tools of the build `make llama-cpp` made and their version (`tools.py`, whose
names this face re-exports), the build's self-check (`check.py`), libllama through the Python binding (`binding.py`),
the GGUF file reader (`gguf_file.py`), the converter's entry point (`convert.py`), convert/imatrix/quantize as
library steps (`steps.py`), the full-size synthetic GGUFs (`full_size.py`), and the one table of GGUF tensor names
and classes (`names.py`).

A floor of its own: nothing here imports a method, a recipe, a source, a runtime, a quality command, the plan, a
run or the report. `quantlab/methods/gguf.py` and `quantlab/runtimes/libllama.py` are thin users of it.
"""

from quantlab.llamacpp.tools import (  # noqa: F401
    BUILD_HINT, BUILD_SCHEME, CHECK_HINT, NEEDS_IMATRIX, SDIST_VERSION, SELF_CHECK_ENV, TAIL_LINES, TOOLS, LlamaCpp,
    available, bits_per_weight, build_info, check_record, check_tensor_type, check_type, cpu_code, cpu_identity,
    default_root, foreign_libraries, imatrix_data_types, imatrix_min_chunks, imatrix_tensor_types, loaded_cpu_backend,
    locate, main_tensor_type, moe_only, quant_types, run_tool, tool_env, version_text, write_check,
)
