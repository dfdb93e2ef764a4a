"""Triton kernels of fastsp, installed as `fastsp.kernels` (setup.py maps this folder there).

This folder is only ever meant to be imported as `fastsp.kernels`. But `python -m ...` from the
repository root puts the root first on sys.path, where this folder would shadow the unrelated
top-level package `kernels` (Hugging Face's hub kernels, which transformers depends on and
diffusers imports when it is installed). Imported under that bare name, this file steps aside:
it loads the package of that name from the rest of sys.path in its own place in sys.modules
(the import system returns what sys.modules holds once the module has run). Where none is
installed it leaves an empty namespace package (no `__file__`, no version), which is how
transformers' and diffusers' availability checks recognise a folder that merely shadows a name.
"""

if __name__ != "fastsp.kernels":
    import sys
    from importlib.machinery import ModuleSpec, PathFinder
    from importlib.util import module_from_spec
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent

    def _elsewhere(entry: str) -> bool:
        try:
            return Path(entry or ".").resolve() != _root
        except OSError:
            return True

    _spec = PathFinder.find_spec(__name__, [p for p in sys.path if _elsewhere(p)])
    if _spec is None:
        _spec = ModuleSpec(__name__, None, is_package=True)
        _spec.submodule_search_locations = []
    _module = module_from_spec(_spec)
    sys.modules[__name__] = _module
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
