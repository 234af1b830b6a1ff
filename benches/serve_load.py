#!/usr/bin/env python3
"""A load generator for OpenAI-compatible servers, measuring what `vllm bench serve` measures.

Standard library only (it runs on the GPU machine, which has no network and no `openai`
package). Requests go to `POST /v1/completions` with token-id prompts, `stream: true`,
`stream_options.include_usage`, greedy sampling and `ignore_eos` (vLLM's and llama-server's
extension, and ours), so every server computes the same number of tokens.

Workloads (`--workload`):
  random   every request a distinct random prompt of --input-len tokens.
  prefix   every request one shared random prefix of --prefix-len tokens (a system prompt)
           plus --input-len distinct tokens: what a prefix cache is for.

Arrivals: `--rate R` sends requests as a Poisson process of R requests/s (open loop);
`--rate inf` (default) sends them all at once. `--concurrency C` caps the requests in flight
in both modes (a client waits for a slot, as `vllm bench serve --max-concurrency` does).

Reported per run (mean, p50, p99 where a distribution): request throughput, output tokens/s,
total tokens/s, TTFT (time to first token), TPOT (time per output token after the first),
ITL (gap between streamed tokens), end-to-end latency, and goodput: completed requests/s that
met the SLO (`--slo-ttft-ms`, `--slo-tpot-ms`). Errors are counted by HTTP status, never
retried. One JSON object per run is appended to --out (JSON lines).

    python3 serve_load.py --base-url http://127.0.0.1:8000 --model M --workload random \
        --num-prompts 256 --input-len 512 --output-len 128 --concurrency 64 --label ours \
        --out results.jsonl
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs, scale=1000.0):
    """mean / p50 / p99 in milliseconds (scale) of a list of seconds."""
    if not xs:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": statistics.fmean(xs) * scale, "p50": percentile(xs, 50) * scale, "p99": percentile(xs, 99) * scale}


def make_prompts(args):
    r = random.Random(args.seed)
    draw = lambda n: [r.randrange(args.vocab_lo, args.vocab_hi) for _ in range(n)]
    prefix = draw(args.prefix_len) if args.workload == "prefix" else []
    return [prefix + draw(args.input_len) for _ in range(args.num_prompts)]


def one_request(url, headers, body, timeout):
    """Sends one streaming completion; returns a record of its timings (or its error)."""
    rec = {"ok": False, "ttft": None, "itl": [], "e2e": None, "output_tokens": 0, "chunks": 0, "error": None}
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", parts.path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            rec["error"] = f"HTTP {resp.status}: {resp.read(300)!r}"
            rec["status"] = resp.status
            return rec
        last = None
        usage = None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                rec["error"] = f"stream error: {event['error']}"
                return rec
            if event.get("usage"):
                usage = event["usage"]
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                now = time.perf_counter()
                rec["chunks"] += 1
                if last is None:
                    rec["ttft"] = now - start
                else:
                    rec["itl"].append(now - last)
                last = now
        rec["e2e"] = time.perf_counter() - start
        rec["output_tokens"] = usage["completion_tokens"] if usage else rec["chunks"]
        rec["ok"] = rec["ttft"] is not None
        if not rec["ok"]:
            rec["error"] = "no token was streamed"
    except Exception as e:  # a reset, a timeout: counted, never retried
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return rec


def run(args):
    prompts = make_prompts(args)
    url = args.base_url.rstrip("/") + "/v1/completions"
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    slots = threading.Semaphore(args.concurrency)
    records = [None] * len(prompts)
    threads = []
    rng = random.Random(args.seed + 1)

    def worker(i, prompt):
        try:
            body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            records[i] = one_request(url, headers, body, args.timeout)
        finally:
            slots.release()

    if args.warmup:
        # Full-length prompts, a few tokens each, `warmup` at once: first-use kernel builds and
        # batch shapes happen before the clock starts (both servers get the same warm-up). Its
        # prompts share nothing with the measured ones (no prefix-cache hits carried over).
        wr = random.Random(args.seed + 1000)
        warm_prompts = [[wr.randrange(args.vocab_lo, args.vocab_hi) for _ in range(len(prompts[0]))] for _ in range(args.warmup)]
        warm = [threading.Thread(target=one_request, args=(url, headers, {
            "model": args.model, "prompt": warm_prompts[i], "max_tokens": 4,
            "temperature": 0.0, "stream": True, "ignore_eos": True}, args.timeout), daemon=True) for i in range(args.warmup)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        if args.rate != float("inf") and i > 0:
            time.sleep(rng.expovariate(args.rate))
        slots.acquire()
        t = threading.Thread(target=worker, args=(i, prompt), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    duration = time.perf_counter() - start

    ok = [r for r in records if r and r["ok"]]
    errors = {}
    for r in records:
        if not (r and r["ok"]):
            key = (r or {}).get("error", "lost")[:120]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(len(p) for p, r in zip(prompts, records) if r and r["ok"])
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    itl = [x for r in ok for x in r["itl"]]
    good = [r for r in ok if r["ttft"] * 1000 <= args.slo_ttft_ms
            and (r["output_tokens"] <= 1 or (r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) * 1000 <= args.slo_tpot_ms)]
    result = {
        "label": args.label, "workload": args.workload, "rate": None if args.rate == float("inf") else args.rate,
        "concurrency": args.concurrency, "num_prompts": len(prompts), "input_len": args.input_len,
        "prefix_len": args.prefix_len if args.workload == "prefix" else 0, "output_len": args.output_len,
        "completed": len(ok), "errors": errors, "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration, "output_tokens": out_tokens,
        "ttft_ms": summary([r["ttft"] for r in ok]), "tpot_ms": summary(tpot), "itl_ms": summary(itl),
        "e2e_ms": summary([r["e2e"] for r in ok]),
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}, "goodput": len(good) / duration,
    }
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key")
    p.add_argument("--workload", choices=["random", "prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-lo", type=int, default=100)
    p.add_argument("--vocab-hi", type=int, default=151000)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--warmup", type=int, default=0, help="N concurrent 4-token requests on full-length prompts before the clock starts")
    p.add_argument("--label", default="")
    p.add_argument("--out", help="append the result as one JSON line")
    args = p.parse_args()
    if args.concurrency < 1 or args.num_prompts < 1 or not args.rate > 0:
        p.error("--concurrency and --num-prompts must be at least 1 and --rate positive")
    result = run(args)
    line = json.dumps(result)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    brief = {k: result[k] for k in ("label", "workload", "rate", "concurrency", "completed", "request_throughput", "output_throughput")}
    brief.update({"ttft_p99_ms": result["ttft_ms"]["p99"], "tpot_mean_ms": result["tpot_ms"]["mean"], "errors": result["errors"]})
    print(json.dumps(brief))


if __name__ == "__main__":
    main()
