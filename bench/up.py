"""`dynalign up` as a user runs it, today's design against the current one in one run: the whole
process tree's memory, the learner's step split, users' latency with the learner idle and while
it steps, and freshness (first chat to the first promoted adapter answering).

    python bench/up.py                       # anchor: the commit before issue 21 (a worktree)
    python bench/up.py --anchor main --out /tmp/up.json

Each arm is `python -m dynalign up` on SmolLM2-135M-Instruct with `up`'s defaults, in a fresh
data directory, run from its own source tree (the anchor from a git worktree of --anchor, so
"today" is today's code, not a setting of the new one). The arms run one after the other: on two
cores two trees at once would measure each other. Per arm:
  ready      /health answers, the learner's metrics answer, and the tree's CPU is quiet;
  idle       `--idle-requests` user chats (one client, 32 tokens, metadata.train=false so they
             feed nothing) with the learner waiting;
  feed       `--chats` distinct chats that are logged: the learner's work, the same in every arm;
             the first one starts the freshness clock;
  quiet      no user load until an answer comes from a promoted adapter
             (x-dynalign-adapter-version; a 1-token probe every 5 s) and MIN_QUIET_STEPS steps
             are taken, or `--max-minutes`: freshness, and the step split with the learner
             alone on the machine;
  idle on the adapter  the learner paused (an operator's pause-learning) once its step is
             done, `--idle-requests` chats again, now answered by the promoted adapter: users'
             baseline on what serves them (a LoRA costs a CPU decode step more); then resume;
  busy       four more logged chats (two steps' work), then one client chats (not logged) for
             `--busy-minutes`; a request counts as "while stepping" when the learner's
             step_in_flight gauge read 1 at its start and its end; the steps taken meanwhile
             say what users' priority costs the learner;
  stop       SIGINT, as Ctrl-C; then any process left from the tree is listed.
Memory is sampled every 2 s over the whole tree: RSS summed (what `ps` shows, shared library
pages counted once per process) and PSS summed (each shared page split among its users: what
the tree costs the machine), by role. "steady while stepping" is the median over samples taken
while a step was in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.kafka import free_port  # noqa: E402

ANCHOR_REF = "ebfd62e"  # main before issue 21: its learner runs a vLLM engine of its own
USER_PROMPT = [{"role": "user", "content": "Give me one tip for sleeping better."}]
MIN_QUIET_STEPS = 3
OPERATOR_TOKEN = "bench-up-operator-token"  # pauses the learner for the idle-on-adapter phase
FEED = [
    "How can neighbours share tools without losing them?",
    "Explain photosynthesis to a ten-year-old.",
    "What should a small town do about a closing library?",
    "Write a haiku about rain on a tin roof.",
    "How do I apologise to a friend I let down?",
    "Suggest a weekly plan to learn basic Spanish.",
    "What are the trade-offs of working from home?",
    "How can a team decide fairly who works on holidays?",
    "Describe a healthy breakfast for a busy morning.",
    "What makes a good bicycle lane design?",
    "How should a family split chores among teenagers?",
    "Give three ways to cut food waste at home.",
]
BUSY_FEED = [  # the busy phase's logged chats: two steps' prompts
    "How can a village share one well fairly in a drought?",
    "Explain how vaccines train the immune system.",
    "What should a club do when two members keep arguing?",
    "Give advice to someone starting their first job.",
]
STEP_LINE = re.compile(
    r"step\s+(\d+)\s.*?(\d+) tok/s\s+batch ([\d.]+)s rollout ([\d.]+)s reward ([\d.]+)s "
    r"update ([\d.]+)s"
)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def role(process: psutil.Process, root: int) -> str:
    try:
        cmdline = " ".join(process.cmdline())
        name = process.name()
    except psutil.Error:
        return "gone"
    if process.pid == root:
        return "server"
    if " learn " in f" {cmdline} ":
        return "learner"
    if "tansu" in cmdline or "tansu" in name:
        return "broker"
    if "EngineCore" in name or "EngineCore" in cmdline:
        return "engine core"
    return "other"


@dataclass
class Learner:
    """The learner's metrics endpoint, polled."""

    url: str
    in_flight: bool = False

    def value(self, name: str) -> float | None:
        try:
            text = httpx.get(self.url, timeout=2).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def poll(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            self.in_flight = self.value("dynalign_learner_step_in_flight") == 1


@dataclass
class Tree:
    root: int
    samples: list[dict] = field(default_factory=list)

    def sample(self, stepping: bool) -> None:
        try:
            top = psutil.Process(self.root)
            processes = [top, *top.children(recursive=True)]
        except psutil.Error:
            return
        rss: dict[str, float] = {}
        pss: dict[str, float] = {}
        for p in processes:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            r = role(p, self.root)
            rss[r] = rss.get(r, 0) + info.rss / 2**30
            pss[r] = pss.get(r, 0) + info.pss / 2**30
        self.samples.append(
            {
                "t": time.time(),
                "stepping": stepping,
                "rss_gib": sum(rss.values()),
                "pss_gib": sum(pss.values()),
                "rss_by_role": rss,
                "pss_by_role": pss,
            }
        )

    def run(self, learner: Learner, stop: threading.Event) -> None:
        while not stop.wait(2.0):
            self.sample(learner.in_flight)

    def summary(self) -> dict:
        def med(kind: str, rows: list[dict]) -> float | None:
            return statistics.median(s[kind] for s in rows) if rows else None

        stepping = [s for s in self.samples if s["stepping"]]
        peak = max(self.samples, key=lambda s: s["rss_gib"]) if self.samples else None
        by_role = {}
        for kind in ("rss_by_role", "pss_by_role"):
            roles = {r for s in stepping for r in s[kind]}
            by_role[kind] = {
                r: statistics.median(s[kind].get(r, 0) for s in stepping) for r in roles
            }
        return {
            "samples": len(self.samples),
            "samples_stepping": len(stepping),
            "peak_rss_gib": peak["rss_gib"] if peak else None,
            "peak_pss_gib": max((s["pss_gib"] for s in self.samples), default=None),
            "steady_rss_gib_while_stepping": med("rss_gib", stepping),
            "steady_pss_gib_while_stepping": med("pss_gib", stepping),
            "steady_while_stepping_by_role": by_role,
        }


def chat(client: httpx.Client, model: str, messages, max_tokens: int, train: bool) -> dict:
    started = time.perf_counter()
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "metadata": {"train": "true" if train else "false"},
        },
    )
    response.raise_for_status()
    return {
        "latency_s": time.perf_counter() - started,
        "tokens": response.json()["usage"]["completion_tokens"],
        "version": response.headers.get("x-dynalign-adapter-version", ""),
    }


def users_summary(rows: list[dict]) -> dict:
    latencies = [r["latency_s"] for r in rows]
    seconds = sum(latencies)
    return {
        "requests": len(rows),
        "p50_s": percentile(latencies, 0.5),
        "p95_s": percentile(latencies, 0.95),
        "output_tokens_per_s": sum(r["tokens"] for r in rows) / seconds if seconds else None,
    }


def wait_quiet(root: int, timeout_s: float, threshold: float = 25.0) -> float:
    """Until the tree's CPU stays under `threshold` % for 3 s in a row; the seconds waited."""
    started, calm = time.time(), 0
    while time.time() - started < timeout_s and calm < 3:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
        for p in processes:
            p.cpu_percent(None)
        time.sleep(1.0)
        busy = sum(p.cpu_percent(None) for p in processes if p.is_running())
        calm = calm + 1 if busy < threshold else 0
    return time.time() - started


def run_arm(name: str, source: Path, args, work: Path) -> dict:
    data_dir = work / name / "data"
    data_dir.mkdir(parents=True)
    port, metrics_port = free_port(), free_port()
    log_path = work / name / "up.log"
    env = {
        **os.environ,
        "DYNALIGN_LEARNER__METRICS_PORT": str(metrics_port),
        "DYNALIGN_SERVING__OPERATOR_TOKENS": json.dumps({"bench": OPERATOR_TOKEN}),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("OMP_NUM_THREADS", None)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynalign",
                "up",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
            ],
            cwd=source,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    learner = Learner(f"http://127.0.0.1:{metrics_port}/metrics")
    tree = Tree(process.pid)
    stop = threading.Event()
    started = time.time()
    result: dict = {"arm": name, "source": str(source)}
    try:
        client = httpx.Client(base_url=base, timeout=600)
        while True:  # ready: server healthy, learner's metrics up, the tree quiet
            if process.poll() is not None:
                raise RuntimeError(f"{name}: up exited {process.returncode}; see {log_path}")
            try:
                if (
                    client.get("/health").status_code == 200
                    and learner.value("dynalign_learner_step_in_flight") is not None
                ):
                    break
            except httpx.HTTPError:
                pass
            if time.time() - started > 600:
                raise RuntimeError(f"{name}: not ready in 600 s; see {log_path}")
            time.sleep(1.0)
        result["ready_s"] = time.time() - started
        result["quiet_wait_s"] = wait_quiet(process.pid, 300)
        model = client.get("/v1/models").json()["data"][0]["id"]
        for target in (learner.poll, lambda s: tree.run(learner, s)):
            threading.Thread(target=target, args=(stop,), daemon=True).start()

        idle = [
            chat(client, model, USER_PROMPT, 32, train=False) for _ in range(args.idle_requests)
        ]
        result["users_idle"] = users_summary(idle)

        first_chat = time.time()
        for prompt in FEED[: args.chats]:
            chat(client, model, [{"role": "user", "content": prompt}], 64, train=True)
        result["feed_s"] = time.time() - first_chat

        # Quiet: no user load while the learner steps to its first promoted adapter, and on to
        # MIN_QUIET_STEPS steps (the step split needs more than the first, which ran beside the
        # feed); a 1-token probe every 5 s asks which version answers.
        promoted_at, versions = None, set()
        deadline = first_chat + args.max_minutes * 60
        while time.time() < deadline and process.poll() is None:
            row = chat(client, model, USER_PROMPT, 1, train=False)
            versions.add(row["version"])
            if row["version"].isdigit() and promoted_at is None:
                promoted_at = time.time()
            steps = learner.value("dynalign_learner_steps_total") or 0
            if promoted_at is not None and steps >= MIN_QUIET_STEPS:
                break
            time.sleep(5)  # the probe's pace, not a synchronisation
        result["freshness_min"] = (promoted_at - first_chat) / 60 if promoted_at else None
        result["served_versions"] = sorted(versions)
        result["quiet_steps"] = learner.value("dynalign_learner_steps_total")

        # Idle on the adapter: users' baseline once an adapter serves them (on the CPU a LoRA
        # costs a decode step more than the bare model), with the learner paused by an
        # operator once its step in flight is done; then it resumes.
        admin = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        client.post("/admin/learning/pause", json={"reason": "bench"}, headers=admin)
        paused = time.time()
        while learner.value("dynalign_learner_step_in_flight") != 0:
            if time.time() - paused > 600:
                raise RuntimeError(f"{name}: the learner's step did not end in 600 s")
            time.sleep(1.0)
        idle_live = [
            chat(client, model, USER_PROMPT, 32, train=False) for _ in range(args.idle_requests)
        ]
        result["users_idle_on_adapter"] = {
            **users_summary(idle_live),
            "versions": sorted({r["version"] for r in idle_live}),
        }
        client.post("/admin/learning/resume", json={"reason": "bench"}, headers=admin)

        # Busy: more logged chats give the learner work; then one client chats throughout
        # (not logged) for --busy-minutes, and a request counts while the learner steps.
        for prompt in BUSY_FEED:
            chat(client, model, [{"role": "user", "content": prompt}], 64, train=True)
        stepping = []
        deadline = time.time() + args.busy_minutes * 60
        while time.time() < deadline and process.poll() is None:
            before = learner.in_flight
            row = chat(client, model, USER_PROMPT, 32, train=False)
            if before and learner.in_flight:
                stepping.append(row)
        result["users_stepping"] = users_summary(stepping)
        result["busy_steps"] = learner.value("dynalign_learner_steps_total") - (
            result["quiet_steps"] or 0
        )
        idle_p50, step_p50 = result["users_idle"]["p50_s"], result["users_stepping"]["p50_s"]
        result["p50_stepping_over_idle"] = step_p50 / idle_p50 if step_p50 and idle_p50 else None
        live_p50 = result["users_idle_on_adapter"]["p50_s"]
        result["p50_stepping_over_idle_on_adapter"] = (
            step_p50 / live_p50 if step_p50 and live_p50 else None
        )
    finally:
        stop.set()
        pids = {process.pid}
        try:
            pids |= {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
        except psutil.Error:
            pass
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        result["left_running_after_ctrl_c"] = left
        for pid in left:
            psutil.Process(pid).kill()
    steps = [
        dict(
            zip(
                ("step", "tokens_per_s", "batch", "rollout", "reward", "update"),
                map(float, m.groups()),
                strict=True,
            )
        )
        for m in STEP_LINE.finditer(log_path.read_text())
    ]
    result["steps"] = steps
    quiet = int(result.get("quiet_steps") or 0)
    for key, rows in (("quiet", steps[:quiet]), ("busy", steps[quiet:])):
        result[f"step_seconds_median_{key}"] = {
            phase: statistics.median(s[phase] for s in rows) if rows else None
            for phase in ("rollout", "reward", "update", "tokens_per_s")
        }
    result["memory"] = tree.summary()
    result["memory_samples"] = tree.samples
    return result


def worktree(ref: str, work: Path) -> Path:
    path = work / f"anchor-{ref}"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchor", default=ANCHOR_REF, help="git ref of today's design")
    parser.add_argument("--chats", type=int, default=12)
    parser.add_argument("--idle-requests", type=int, default=16)
    parser.add_argument("--max-minutes", type=float, default=14.0, help="quiet phase's limit")
    parser.add_argument("--busy-minutes", type=float, default=3.0)
    parser.add_argument("--arms", default="anchor,current")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "up.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dynalign-bench-up-"))
    commit = subprocess.run(  # what the current arm runs: HEAD when the run starts
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    arms = []
    try:
        for name in args.arms.split(","):
            source = worktree(args.anchor, work) if name == "anchor" else REPO
            arms.append(run_arm(name, source, args, work))
            print(
                json.dumps({k: v for k, v in arms[-1].items() if k != "memory_samples"}, indent=1)
            )
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "up",
                "commit": commit,
                "anchor": args.anchor,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "settings": {k: str(v) for k, v in vars(args).items()},
                "arms": arms,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
