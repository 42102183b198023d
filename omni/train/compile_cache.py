"""JAX's persistent compilation cache, so a second `omni train`, `omni eval` or `omni generate` with the same
shapes loads its compiled programs from disk instead of compiling them again.

    compile_cache = "auto"    <$OMNI_CACHE or ~/.cache/omni>/jax-compile (the config's top-level key)
                    "off"     no cache
                    FOLDER    that folder (a local path or a gs:// URL: JAX reads and writes its cache through etils.epath)
    OMNI_COMPILE_CACHE=off|FOLDER in the environment overrides the config (`omni generate` has no --set).

enable() is called once per command before its first compile (the trainer, omni eval, omni generate); omni bench
does not, since compile time is one of the things it measures. Every program is cached, however short its
compile (JAX's default keeps only those over 1 s, which leaves out most CPU programs), and stats() counts the
programs read from the cache and compiled in this process (JAX's monitoring events). A key is the program, its
shardings and devices, and the jax/jaxlib version; a changed shape or config is a new entry, never a wrong hit.
Entries are never deleted by omni: delete the folder to reclaim the space.
"""

from __future__ import annotations

import os

import jax

from omni import storage

FOLDER = "jax-compile"
_counts = {"hits": 0, "misses": 0}
_state: dict = {"folder": None, "listening": False}


def folder_for(setting: str):
    """The cache folder a `compile_cache` setting names (OMNI_COMPILE_CACHE first), or None for off."""
    setting = os.environ.get("OMNI_COMPILE_CACHE") or setting or "auto"
    if setting == "off":
        return None
    if setting == "auto":
        return storage.path(os.environ.get("OMNI_CACHE") or "~/.cache/omni") / FOLDER
    return storage.path(setting)


def enable(setting: str, log=print):
    """Points JAX's persistent compilation cache at the folder `setting` names; returns it (None: off).

    JAX opens the cache at the first compile after a folder is set and keeps it for the process, so the first
    folder set wins. A folder that cannot be made is a warning, not an error: the command runs uncached."""
    folder = folder_for(setting)
    if folder is None or _state["folder"] is not None:
        return _state["folder"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (a StorageError too: a bucket that cannot be reached)
        log(f"omni: warning: compile cache folder {folder} cannot be made ({e.strerror or e}); compiling without "
            "a cache (set compile_cache=off, or another folder)")
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor, whatever the filesystem
    if not _state["listening"]:
        jax.monitoring.register_event_listener(_count)
        _state["listening"] = True
    _state["folder"] = folder
    return folder


def _count(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _counts["misses"] += 1


def stats() -> dict:
    """{"folder", "hits", "misses"}: programs read from the cache and compiled (then written) in this process."""
    return {"folder": str(_state["folder"]) if _state["folder"] else None, **_counts}


def summary() -> str:
    """One line for the log: where the cache is and what this process took from it."""
    s = stats()
    if s["folder"] is None:
        return "compile cache off"
    return f"compile cache {s['folder']}: {s['hits']} program(s) read from it, {s['misses']} compiled and added"
