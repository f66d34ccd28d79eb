#!/usr/bin/env python3
"""The minimum Rust each workspace crate really needs: the highest
`rust-version` over the crate and everything it builds with (normal and
build dependencies, features as resolved; dev-dependencies count for
`--all-targets`, listed apart), from `cargo metadata`.

    scripts/msrv.py            # table: crate, needs (lib/bin), needs with tests, declared
    scripts/msrv.py --check    # exit 1 unless the workspace's rust-version is
                               # what the workspace needs, and every crate declares it

README's "Needs" line quotes the numbers this prints.
"""
import json
import re
import subprocess
import sys


def version(v):
    return tuple(int(x) for x in re.findall(r"\d+", v or "0"))[:2] or (0,)


def show(v):
    return ".".join(map(str, v)) if v != (0,) else "-"


def main():
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked"],
        check=True, capture_output=True, text=True).stdout)
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    members = sorted(meta["workspace_members"], key=lambda i: pkgs[i]["name"])

    def closure(root, with_dev):
        seen, stack, worst = set(), [(root, True)], ((0,), "")
        while stack:
            pid, top = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            p = pkgs[pid]
            # Workspace crates declare the number this computes: only
            # external packages count.
            if pid not in members:
                v = version(p.get("rust_version"))
                if v > worst[0]:
                    worst = (v, f'{p["name"]} {p["version"]}')
            for dep in nodes[pid]["deps"]:
                kinds = {k["kind"] for k in dep["dep_kinds"]}
                if kinds - {"dev"} or (with_dev and top):
                    stack.append((dep["pkg"], False))
        return worst

    rows = []
    for m in members:
        need, why = closure(m, False)
        need_dev, why_dev = closure(m, True)
        declared = version(pkgs[m].get("rust_version"))
        rows.append((pkgs[m]["name"], need, why, need_dev, why_dev, declared))
    print(f'{"crate":30} {"needs":>6}  {"(because of)":32} {"+tests":>6}  {"declared":>8}')
    for name, need, why, need_dev, why_dev, declared in rows:
        print(f"{name:30} {show(need):>6}  {why:32} {show(need_dev):>6}  {show(declared):>8}")
    workspace = max(max(r[1], r[3]) for r in rows)
    print(f"workspace (cargo build/test --workspace): {show(workspace)}")
    if "--check" in sys.argv[1:]:
        bad = [r[0] for r in rows if r[5] != workspace]
        if bad:
            print(f"msrv: rust-version must be {show(workspace)} (the workspace's need) in: "
                  f"{', '.join(bad)} (workspace Cargo.toml, inherited with "
                  f"rust-version.workspace = true)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
