"""Run by test_compile_worker_pythonpath.py under the base interpreter with this venv on PYTHONPATH: start the
grammar compile worker and compile one regex."""
# A PYTHONPATH-only install (as the GPU wave's /tmp/site): llguidance is not in this interpreter's own site.
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cw", "runtime/constrained/compile_worker.py")  # not the package: no torch
cw = importlib.util.module_from_spec(spec); spec.loader.exec_module(cw)
import llguidance.hf
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
lltok = llguidance.hf.from_tokenizer(tok)
proc = cw.CompileProcess(cw.tokenizer_description(lltok), start_timeout_s=60)
print("compiled in time:", proc.run("regex", "[0-9]+", 30))
proc.close()
