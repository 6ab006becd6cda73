#!/usr/bin/env python3
"""Old against new: `moat run --rm busybox -- true` with two builds,
alternated run by run (so both see the same moments of a noisy host), each
build on a root of its own (one build's clean-up never touches the other's).

    sudo bench/run/ab.py OLD_DIR NEW_DIR [RUNS] [-- extra run args]

OLD_DIR and NEW_DIR each hold a `moat` and a `moat-supervisor`. Prints the
median and mean per build and the change. Uses /var/tmp/moat-ab.*, removed
at the end.
"""
import os, shutil, statistics, subprocess, sys, tempfile, time

def main():
    args = sys.argv[1:]
    extra = []
    if "--" in args:
        i = args.index("--")
        args, extra = args[:i], args[i + 1:]
    if len(args) < 2:
        sys.exit(__doc__)
    builds = {"old": args[0], "new": args[1]}
    runs = int(args[2]) if len(args) > 2 else 60
    work = tempfile.mkdtemp(prefix="moat-ab.", dir="/var/tmp")
    os.chmod(work, 0o755)
    cmds = {}
    envs = {}
    for k, (name, d) in enumerate(builds.items()):
        root = os.path.join(work, "r-" + name)
        project = os.path.join(work, "p-" + name)
        os.makedirs(project)
        with open(os.path.join(project, "moat.yml"), "w") as f:
            f.write(f"schema_version: 1\nproject: bench-ab-{name}\n"
                    f"addressing: {{base: \"10.{179 + k}\", zone_step: 1}}\n"
                    "domains:\n  lab:\n    trust_level: trusted\n    egress: none\n"
                    "    machines: {}\n")
        base = [os.path.join(d, "moat"), "--root", root, "-f", project, "--color", "never"]
        envs[name] = dict(os.environ, MOAT_SUPERVISOR=os.path.join(d, "moat-supervisor"))
        cmds[name] = base + ["run", "--rm"] + extra + ["busybox", "--", "true"]
    times = {n: [] for n in builds}
    try:
        for n, c in cmds.items():
            for setup in (["apply", "-q"], ["image", "build", "busybox", "-q"]):
                subprocess.run(c[:7] + setup, env=envs[n], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(runs + 3):
            order = list(builds) if i % 2 == 0 else list(reversed(list(builds)))
            for n in order:
                t = time.perf_counter()
                r = subprocess.run(cmds[n], env=envs[n])
                dt = (time.perf_counter() - t) * 1000
                if r.returncode != 0:
                    sys.exit(f"{n}: exit {r.returncode}")
                if i >= 3:  # warm-up
                    times[n].append(dt)
    finally:
        for n in builds:
            subprocess.run(cmds[n][:7] + ["destroy", "--all", "--force"], env=envs[n],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    for n, v in times.items():
        print(f"{n}: median {med[n]:.2f} ms, mean {statistics.mean(v):.2f} ms ({len(v)} runs)")
    print(f"change: {med['old']:.2f} -> {med['new']:.2f} ms ({(med['new'] / med['old'] - 1) * 100:+.1f} %)")

if __name__ == "__main__":
    main()
