"""One layer's query round trip through kflume's UCX transport against raw ucxx, same run.

The weight node sends q `[B, Hq, D]` and gets back out `[B, Hq, D]` and lse `[B, Hq]`
(B=32, Hq=32, D=128, bf16: 256 KiB out, 260 KiB back). The peer process answers at
once (no attention computed), so the figures are transport only:

- raw: ucxx blocking API, one tag message each way, receives pre-posted, busy polling:
  the floor for moving these bytes;
- kflume: `NodeClient`-style calls over `UcxTransport` (header + q out; header + out and
  lse packed in one tensor back, as a node replies, into a buffer allocated once), for
  each progress mode;
- kflume-stream: the layers of attend streams (`NodeClient.open_stream`, 32 layers a
  stream): q alone out, the packed reply alone back (`--stream`).

    python benchmarks/transport.py                  # host memory, loopback
    python benchmarks/transport.py --device cuda    # GPU0 <-> GPU1 (needs 2 GPUs)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header as bench_header  # noqa: E402
from common import save_json  # noqa: E402

from kflume.comm.wire import pack_states, state_row_bytes  # noqa: E402

HQ, D = 32, 128
B = int(os.environ.get("KFLUME_BENCH_B", "32"))  # rows of q (--batch)
# stream replies from one buffer instead of a buffer per layer (--same-reply)
SAME_REPLY = os.environ.get("KFLUME_BENCH_SAME_REPLY") == "1"
BUSY = os.environ.get("KFLUME_BENCH_BUSY", "none")  # what runs on GPU0 meanwhile (--busy)


def _device(kind: str) -> torch.device:
    return torch.device("cuda:0" if kind == "cuda" else "cpu")


def _env(kind: str, rank: int) -> None:
    os.environ.setdefault("UCX_MM_ERROR_HANDLING", "y")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if kind == "cuda":  # each process sees its own GPU as device 0 (and the other one)
        os.environ["CUDA_VISIBLE_DEVICES"] = "0,1" if rank == 0 else "1,0"


# ---- raw ucxx ---------------------------------------------------------------------------
def _raw_worker():
    from ucxx._lib import libucxx as L

    ctx = L.UCXContext({}, (L.Feature.TAG, L.Feature.WAKEUP))
    return L, ctx, L.UCXWorker(ctx)


def _raw_wait(w, reqs):
    while not all(r.completed for r in reqs):
        w.progress()
    for r in reqs:
        r.check_error()


def _arr(t):
    from ucxx._lib.arr import Array

    flat = t.reshape(-1).view(torch.uint8)
    return Array(flat if flat.is_cuda else flat.numpy())


def raw_server(kind, q_addr, q_back):
    import numpy as np

    _env(kind, 1)
    L, ctx, w = _raw_worker()
    q_back.put(w.address.tobytes())
    peer = q_addr.get()
    ep = L.UCXEndpoint.create_from_worker_address(
        w, L.UCXAddress.create_from_buffer(np.frombuffer(peer, np.uint8)), True)
    dev = _device(kind)
    qbuf = torch.empty(B * HQ * D * 2, dtype=torch.uint8, device=dev)
    reply = torch.randn(B * HQ * D * 2 + B * HQ * 4, device=dev).view(torch.uint8)[
        : B * HQ * D * 2 + B * HQ * 4].clone()
    while True:
        r = ep.tag_recv(_arr(qbuf), L.UCXXTag(1))
        _raw_wait(w, [r])
        if int(qbuf[0]) == 255 and int(qbuf[1]) == 255:
            break
        s = ep.tag_send(_arr(reply), L.UCXXTag(2))
        _raw_wait(w, [s])


def raw_client(kind, iters, warmup) -> list[float]:
    import numpy as np

    ctx_mp = mp.get_context("spawn")
    q_addr, q_back = ctx_mp.Queue(), ctx_mp.Queue()
    p = ctx_mp.Process(target=raw_server, args=(kind, q_addr, q_back))
    p.start()
    L, ctx, w = _raw_worker()
    peer = q_back.get(timeout=120)
    q_addr.put(w.address.tobytes())
    ep = L.UCXEndpoint.create_from_worker_address(
        w, L.UCXAddress.create_from_buffer(np.frombuffer(peer, np.uint8)), True)
    dev = _device(kind)
    q = torch.randn(B, HQ, D, device=dev).to(torch.bfloat16)
    back = torch.empty(B * HQ * D * 2 + B * HQ * 4, dtype=torch.uint8, device=dev)
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        r = ep.tag_recv(_arr(back), L.UCXXTag(2))
        s = ep.tag_send(_arr(q), L.UCXXTag(1))
        _raw_wait(w, [r, s])
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e6)
    stop = torch.full((B * HQ * D * 2,), 255, dtype=torch.uint8, device=dev)
    _raw_wait(w, [ep.tag_send(_arr(stop), L.UCXXTag(1))])
    p.join(30)
    return times


# ---- kflume -----------------------------------------------------------------------------
def kflume_server(kind, progress, q_out):
    _env(kind, 1)
    from kflume.comm import Header
    from kflume.comm.ucx import SERVER_INLINE_BYTES, UcxTransport

    t = UcxTransport(token="bench", progress=progress, inline_bytes=SERVER_INLINE_BYTES)
    lis = t.listen("127.0.0.1:0")
    q_out.put(lis.address)
    conn = None
    while conn is None:
        conn = lis.accept()
        t.progress(0.01)
    dev = _device(kind)
    conn.recv_device = dev
    states = pack_states(torch.randn(B, HQ, D, device=dev).to(torch.bfloat16),
                         torch.randn(B, HQ, device=dev))  # a node's reply: one tensor
    seq = 0
    while True:
        (m,) = t.wait([conn.post_recv(seq)], 600.0)
        seq += 1
        m.release()
        if m.header.op == "shutdown":
            break
        if m.header.op == "stream":  # as a node serves one, less the attention
            layers = m.header.info["layers"]
            qs = torch.empty(layers, B, HQ, D, dtype=torch.bfloat16, device=dev)
            res = states.expand(layers, *states.shape).clone()  # a node's: one per layer
            recvs = [conn.post_part_recv(m.header.seq, i + 1, qs[i]) for i in range(layers)]
            for i, r in enumerate(recvs):
                t.wait([r], 600.0)
                reply = states if SAME_REPLY else res[i]
                conn.send_part(m.header.seq, i + 1, reply, ready=True, static=True)
            conn.send(Header("ok", seq=m.header.seq))
            continue
        conn.send(Header("result", seq=m.header.seq), [states])
    t.progress(0.2)


def kflume_client(kind, progress, iters, warmup, stream: bool = False) -> list[float]:
    from kflume.comm.ucx import UcxTransport
    from kflume.weight.client import NodeClient

    ctx_mp = mp.get_context("spawn")
    q = ctx_mp.Queue()
    p = ctx_mp.Process(target=kflume_server, args=(kind, progress, q))
    p.start()
    t = UcxTransport(token="bench", progress=progress)
    c = NodeClient.connect("bench", t, q.get(timeout=120))
    dev = _device(kind)
    qt = torch.randn(B, HQ, D, device=dev).to(torch.bfloat16)
    into = torch.empty(B, state_row_bytes(HQ, D, torch.bfloat16), device=dev,
                       dtype=torch.uint8)  # out and lse, one reply tensor
    reqs, lens = list(range(B)), [1] * B
    times = []
    st = None
    side = torch.cuda.Stream() if BUSY != "none" else None
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) if BUSY == "gemm" else None
    for i in range(warmup + iters):
        if side is not None and side.query():  # keep this GPU busy meanwhile
            with torch.cuda.stream(side):
                if BUSY == "spin":  # one spinning block, like a graph's wait kernel
                    torch.cuda._sleep(50_000_000)
                else:  # every SM and HBM, like the other micro-batch's FFN
                    for _ in range(20):
                        big @ big
        if stream and i % 32 == 0:  # one stream per 32 layers (its header is not timed)
            if st is not None:
                st.ack.result(30.0)
            st = c.open_stream(range(32), 0, reqs, lens, HQ, D, torch.bfloat16)
        t0 = time.perf_counter()
        if stream:
            st.attend(i % 32, qt, into).result(30.0)
        else:
            c.attend(0, 0, reqs, lens, qt, into).result(30.0)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e6)
    if st is not None:
        sent = (warmup + iters) % 32 or 32
        for layer in range(sent, 32):  # the stream's remaining layers: every layer is sent
            st.attend(layer, qt, into).result(30.0)
        st.ack.result(30.0)
    c.call(__import__("kflume.comm", fromlist=["Header"]).Header("shutdown"))
    t.progress(0.2)
    p.join(30)
    t.close()
    return times


def summary(times: list[float]) -> dict:
    s = sorted(times)
    return {"median_us": statistics.median(s), "p99_us": s[int(0.99 * (len(s) - 1))],
            "n": len(s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--modes", nargs="*", default=["poll", "hybrid", "blocking", "thread"])
    ap.add_argument("--batch", type=int, default=32, help="rows of q (B)")
    ap.add_argument("--stream", action="store_true",
                    help="also the layers of attend streams (poll mode)")
    ap.add_argument("--busy", choices=["none", "spin", "gemm"], default="none",
                    help="keep the weight node's GPU busy during the kflume runs: a spinning "
                         "block (a graph waiting) or matmuls on every SM (an FFN)")
    ap.add_argument("--same-reply", action="store_true",
                    help="the peer answers every layer of a stream from one buffer (a node "
                         "answers from one buffer per layer)")
    args = ap.parse_args()
    os.environ["KFLUME_BENCH_B"] = str(args.batch)  # spawned peers read it too
    os.environ["KFLUME_BENCH_SAME_REPLY"] = "1" if args.same_reply else "0"
    global BUSY
    BUSY = os.environ["KFLUME_BENCH_BUSY"] = args.busy
    _env(args.device, 0)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit("--device cuda needs two GPUs")
    global B
    B = args.batch
    res = {"raw": summary(raw_client(args.device, args.iters, args.warmup))}
    for mode in args.modes:
        iters = args.iters if mode != "thread" else max(200, args.iters // 5)
        res[f"kflume-{mode}"] = summary(kflume_client(args.device, mode, iters, args.warmup))
    if args.stream:
        res["kflume-stream-poll"] = summary(kflume_client(args.device, "poll", args.iters,
                                                          args.warmup, stream=True))
    mb = (B * HQ * D * 2 + B * HQ * D * 2 + B * HQ * 4) / 1e6
    print(bench_header(f"q round trip B={B} Hq={HQ} D={D} bf16 ({args.device} memory), "
                       f"{mb:.2f} MB moved per round trip"))
    raw = res["raw"]["median_us"]
    print("| path | median us | p99 us | median / raw |")
    print("|---|---|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v['median_us']:.1f} | {v['p99_us']:.1f} | "
              f"{v['median_us'] / raw:.2f} |")
    save_json(f"transport-{args.device}-b{B}.json", res)


if __name__ == "__main__":
    main()
