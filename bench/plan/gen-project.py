#!/usr/bin/env python3
"""Write a large moat project for benchmarking `moat plan` / `moat validate`.

    bench/plan/gen-project.py OUT_DIR [--domains 1000] [--machines 10] [--policies 100]

OUT_DIR gets a moat.yml and domains/<name>.yml (one per domain). Domain names
are DNS-safe and at most 9 characters (d0000 ... d9999). Domains are spread
round-robin over the five trust levels, so each zone holds at most
ceil(domains / 5) domains: up to 1,280 domains fit the /24-per-domain
convention (256 per zone). Machines are plain containers without fixed IPs.
"""

import argparse
import os
import sys

TRUST = ["admin", "trusted", "semi-trusted", "untrusted", "disposable"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--machines", type=int, default=10, help="machines per domain")
    ap.add_argument("--policies", type=int, default=100)
    ap.add_argument("--image", default="busybox")
    a = ap.parse_args()
    per_zone = -(-a.domains // len(TRUST))
    if per_zone > 256:
        print(f"error: {a.domains} domains put {per_zone} in a trust zone; at most 256 fit "
              f"(so at most {256 * len(TRUST)} domains)", file=sys.stderr)
        return 2
    if a.domains > 10000:
        print("error: at most 10000 domains (names d0000-d9999)", file=sys.stderr)
        return 2

    os.makedirs(os.path.join(a.out, "domains"), exist_ok=True)
    names = [f"d{i:04d}" for i in range(a.domains)]
    with open(os.path.join(a.out, "moat.yml"), "w") as f:
        f.write("schema_version: 1\n")
        f.write("project: bench\n")
        f.write(f"defaults:\n  image: {a.image}\n")
        if a.policies and a.domains >= 2:
            f.write("policies:\n")
            for p in range(a.policies):
                src = names[p % a.domains]
                dst = names[(p * 7 + 1) % a.domains]
                if src == dst:
                    dst = names[(p * 7 + 2) % a.domains]
                f.write(f"  - {{from: {src}, to: {dst}, ports: [{8000 + p % 1000}], protocol: tcp}}\n")
    for i, name in enumerate(names):
        with open(os.path.join(a.out, "domains", f"{name}.yml"), "w") as f:
            f.write(f"description: bench domain {i}\n")
            f.write(f"trust_level: {TRUST[i % len(TRUST)]}\n")
            f.write("machines:\n")
            for j in range(a.machines):
                f.write(f"  m{j}: {{type: container}}\n")
    print(f"wrote {a.domains} domains x {a.machines} machines "
          f"({a.domains * a.machines} machines, {a.policies} policies) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
