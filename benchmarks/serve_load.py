"""Load on ``omnitok serve``: throughput and latency under 32 concurrent clients, batching on vs off, and the time
to the first audio byte of a streamed spoken answer.

    python benchmarks/serve_load.py runs/demo/bundle --clients 32 --requests 96
    python benchmarks/serve_load.py runs/demo/bundle --clients 8 --requests 32 --max-batch 8 --threads 2 0 --busy 1

Each configuration starts its own server process (``omnitok serve --max-batch N``) on loopback, so the clients'
Python threads never compete with the server for the GIL. Clients send a fixed mix (chat text answers of
``--max-tokens`` tokens and, with ``--tts-share``, ``/v1/audio/speech`` requests) until ``--requests`` are done or
``--seconds`` pass. Then, on the idle server, ``--ttfa-repeats`` streamed spoken answers measure the time from
sending the request to the first SSE chunk carrying audio data. Failures must be 0. ``--threads`` lists the
server's thread counts to compare (0: no ``--threads``, torch's default); ``--busy N`` holds N cores with busy
loops while each configuration runs (a machine another process also uses); a configuration listed twice runs twice.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

from _common import command, machine, table

QUESTIONS = [
    "Describe the picture.",
    "What colour is the circle?",
    "Is the star on the left?",
    "How many objects are there?",
    "Say something about the square.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``omnitok serve`` in a child process, waited for until it answers."""

    def __init__(self, bundle: str, max_batch: int, threads: int, speech_max_tokens: int | None) -> None:
        """``threads`` 0: no ``--threads`` (torch's default)."""
        self.port = _free_port()
        exe = Path(sys.executable).with_name("omnitok")
        cmd = [str(exe), "serve", bundle, "--port", str(self.port), "--max-batch", str(max_batch)]
        cmd += ["--threads", str(threads)] if threads else []
        cmd += ["--log-level", "warning"]
        if speech_max_tokens is not None:
            cmd += ["--speech-max-tokens", str(speech_max_tokens)]
        self.proc = subprocess.Popen(cmd)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                self.model = r.json()["data"][0]["id"]
                return
            except (httpx.HTTPError, KeyError, ValueError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.5)

    def stats(self) -> dict:
        return httpx.get(self.url + "/v1/omnitok/info", timeout=10).json()["stats"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(server: ServerProcess, clients: int, requests: int, seconds: float, max_tokens: int, tts_share: float,
         voice: str) -> dict:  # fmt: skip
    rng = random.Random(0)
    plan = ["tts" if rng.random() < tts_share else "chat" for _ in range(requests)]
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {"chat": [], "tts": []}
    failures: list[str] = []
    sizes: dict[str, list[float]] = {"chat": [], "tts": []}  # answer characters, audio seconds
    next_i = [0]
    t_end = time.perf_counter() + seconds

    def worker() -> None:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            while time.perf_counter() < t_end:
                with lock:
                    i = next_i[0]
                    if i >= len(plan):
                        return
                    next_i[0] += 1
                kind = plan[i]
                t0 = time.perf_counter()
                try:
                    if kind == "chat":
                        body = {
                            "model": server.model,
                            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                            "max_tokens": max_tokens,
                        }
                        r = http.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and "choices" in r.json()
                        size = len(r.json()["choices"][0]["message"]["content"] or "") if ok else 0.0
                    else:
                        body = {"model": server.model, "input": "a small red circle", "voice": voice}
                        r = http.post("/v1/audio/speech", json=body | {"response_format": "wav"})
                        ok = r.status_code == 200 and r.content[:4] == b"RIFF"
                        size = (len(r.content) - 44) / 2 / 16000
                except httpx.HTTPError as e:
                    ok, r = False, e
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies[kind].append(dt)
                        sizes[kind].append(size)
                    else:
                        failures.append(f"{kind}: {getattr(r, 'status_code', r)}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = sum(len(v) for v in latencies.values())
    every = sorted(latencies["chat"] + latencies["tts"])
    return {
        "done": done,
        "wall": wall,
        "rps": done / wall,
        "p50": _pct(every, 50),
        "p99": _pct(every, 99),
        "chat_p50": _pct(sorted(latencies["chat"]), 50),
        "tts_p50": _pct(sorted(latencies["tts"]), 50),
        "chat_chars": statistics.mean(sizes["chat"]) if sizes["chat"] else float("nan"),
        "tts_audio_s": statistics.mean(sizes["tts"]) if sizes["tts"] else float("nan"),
        "failures": failures,
    }


def ttfa(server: ServerProcess, repeats: int, max_tokens: int, voice: str) -> list[float]:
    """Seconds from sending a streamed spoken-answer request to its first audio bytes."""
    out = []
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Say something about the square."}],
        "max_tokens": max_tokens,
        "stream": True,
        "modalities": ["text", "audio"],
        "audio": {"voice": voice, "format": "pcm16"},
    }
    with httpx.Client(base_url=server.url, timeout=600) as http:
        for _ in range(repeats):
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if first is None and (delta.get("audio") or {}).get("data"):
                        first = time.perf_counter() - t0
            if first is not None:
                out.append(first)
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96, help="requests per configuration")
    ap.add_argument("--seconds", type=float, default=180, help="time cap per configuration")
    ap.add_argument("--max-tokens", type=int, default=32, help="text tokens per chat answer")
    ap.add_argument("--tts-share", type=float, default=0.125, help="share of /v1/audio/speech requests")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--ttfa-repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="server torch threads, each a configuration (0: torch's default)",
    )
    ap.add_argument("--busy", type=int, default=0, help="cores held by busy loops while each configuration runs")
    ap.add_argument("--speech-max-tokens", type=int, default=None, help="cap on speech tokens per answer")
    args = ap.parse_args()

    results = {}
    for k, (mb, th) in enumerate([(mb, th) for mb in args.max_batch for th in args.threads]):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        server = ServerProcess(args.bundle, mb, th, args.speech_max_tokens)
        try:
            voices = httpx.get(server.url + "/v1/omnitok/info", timeout=10).json()["voices"] or ["alloy"]
            load(server, 4, 4, 60, 4, 0.0, voices[0])  # warm-up, not counted
            before = server.stats()
            r = load(server, args.clients, args.requests, args.seconds, args.max_tokens, args.tts_share, voices[0])
            after = server.stats()
            r["mean_batch"] = (after["batched_requests"] - before["batched_requests"]) / max(
                1, after["batches"] - before["batches"]
            )
            r["ttfa"] = ttfa(server, args.ttfa_repeats, 16, voices[0])
            results[mb, th, k] = r  # a configuration may be listed twice (repeats)
        finally:
            server.close()
            for h in hogs:
                h.kill()
                h.wait()
        print(
            f"max_batch={mb} threads={th}: {json.dumps({k: v for k, v in r.items() if k != 'failures'}, default=str)}"
        )
        if r["failures"]:
            print(f"  failures: {r['failures'][:5]}")

    rows = []
    for (mb, th, _), r in results.items():
        rows.append(
            [
                f"max_batch {mb}, {th or 'default'} thread(s)",
                r["done"],
                len(r["failures"]),
                r["rps"],
                r["p50"],
                r["p99"],
                r["chat_p50"],
                r["tts_p50"],
                r["chat_chars"],
                r["tts_audio_s"],
                r["mean_batch"],
                statistics.median(r["ttfa"]) if r["ttfa"] else float("nan"),
            ]
        )
    print(f"\n`{command()}`\n\n{machine()}, {args.clients} clients, {args.busy} core(s) held by busy loops\n")
    print(
        table(
            ["config", "done", "failures", "req/s", "p50 s", "p99 s", "chat p50 s", "tts p50 s", "chat answer chars",
             "tts audio s", "mean batch", "TTFA median s"],
            rows,
        )
    )  # fmt: skip
    if len(results) >= 2:
        (ka, a), (kb, b) = list(results.items())[:2]
        print(
            f"\nthroughput ratio {ka} / {kb}: {a['rps'] / b['rps']:.2f}x; p50 latency ratio: {a['p50'] / b['p50']:.2f}x"
        )


if __name__ == "__main__":
    main()
