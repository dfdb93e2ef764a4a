"""Triton's interpreter, without its re-patching at every helper call (tests only).

The interpreter patches triton.language for a kernel's launch and restores it after; it also
patches it again (an inspect.getmembers over the language, about 0.2 ms) at every call of a
@triton.jit helper from inside the kernel, though the launch's patch still holds. In the
kernels' tile loops those calls were most of the interpreter's time. `skip_repatching` makes a
helper's call skip the patch where the running launch has patched the same language modules;
the launch's own patch and restore are unchanged. Where the interpreter's internals are not the
ones this expects (another Triton), it changes nothing.
"""


def skip_repatching() -> None:
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    scope_class = getattr(interpreter, "_LangPatchScope", None)
    tl = getattr(interpreter, "tl", None)
    if patch is None or scope_class is None or tl is None or getattr(patch, "skips", False):
        return
    languages = (tl, tl.core)
    patched: set[int] = set()  # the language modules the running launch has patched

    def patch_once(fn):
        mine = {id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages)}
        if mine and mine <= patched:  # a helper called inside the launch
            return scope_class()
        scope = patch(fn)
        patched.update(mine)
        restore = scope.restore

        def restore_and_forget() -> None:  # the launch has ended
            restore()
            patched.clear()

        scope.restore = restore_and_forget
        return scope

    patch_once.skips = True
    interpreter._patch_lang = patch_once
