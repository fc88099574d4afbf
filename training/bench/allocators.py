"""The host allocators both sides of a comparison run under: found with ``ldconfig -p``, preloaded in a child.

glibc returns the large per-step buffers to the kernel every step and
faults them back in page by page; tcmalloc and jemalloc keep them. Which
allocator makes a side fastest differs between the two sides, so the
comparison times each pair under each one.
"""

import subprocess

# Shared libraries of the allocators tried beside glibc, most preferred first.
ALLOCATOR_LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so.1"),
}
# jemalloc as PyTorch's CPU tuning guides set it (decay off, so freed pages
# stay mapped; large blocks from their own arena, a purging thread).
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Every allocator this mode knows; ``auto`` means glibc plus those installed.
ALLOCATORS = ("glibc", "glibc-thp", "tcmalloc", "jemalloc", "jemalloc-default")


def find_allocator_libraries(ldconfig_text):
    """``{"tcmalloc": path, "jemalloc": path}`` of those that ``ldconfig -p``'s output lists (64-bit entries)."""
    listed = {}
    for line in ldconfig_text.splitlines():
        if "=>" not in line:
            continue
        left, path = line.split("=>", 1)
        parts = left.split()
        if not parts or ("(" in left and "64" not in left.split("(", 1)[1]):
            continue  # a 32-bit library
        listed.setdefault(parts[0], path.strip())
    found = {}
    for name, sonames in ALLOCATOR_LIBRARIES.items():
        for soname in sonames:
            if soname in listed:
                found[name] = listed[soname]
                break
    return found


def installed_allocators():
    """``find_allocator_libraries`` of this system's ``ldconfig -p`` ({} where there is none)."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return find_allocator_libraries(out.stdout)
    return {}


def resolve_allocators(names, found):
    """The allocator names to measure: ``auto`` is glibc and every one of ``found``; unknown or missing names raise."""
    if list(names) == ["auto"]:
        return ["glibc"] + [name for name in ALLOCATOR_LIBRARIES if name in found]
    for name in names:
        if name not in ALLOCATORS:
            raise ValueError(f"unknown allocator {name!r}: one of {', '.join(ALLOCATORS)} or auto")
        library = name.split("-")[0]
        if library in ALLOCATOR_LIBRARIES and library not in found:
            raise ValueError(f"allocator {name!r}: no {' or '.join(ALLOCATOR_LIBRARIES[library])} in ldconfig -p")
    return list(dict.fromkeys(names))


def allocator_environment(name, found, base):
    """``(environment, description)`` of a child process running under allocator ``name``.

    Every allocator setting inherited from ``base`` is dropped first, so
    ``glibc`` means glibc as the system configures it.
    """
    env = {key: value for key, value in base.items() if key not in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    settings = {}
    if name == "glibc-thp":
        settings["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    elif name.startswith("tcmalloc") or name.startswith("jemalloc"):
        settings["LD_PRELOAD"] = found[name.split("-")[0]]
        if name == "jemalloc":
            settings["MALLOC_CONF"] = JEMALLOC_CONF
    env.update(settings)
    description = name if not settings else name + " (" + " ".join(f"{k}={v}" for k, v in settings.items()) + ")"
    return env, description
