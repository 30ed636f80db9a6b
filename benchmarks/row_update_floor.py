"""The machine's floor for a lazy table update: plain C, one pass over a batch's lookups.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/row_update_floor.py
        [--rows 4068791,12000000,30000000] [--batch 2048] [--length 200] [--dim 16]
        [--repeats 5] [--cc cc]

What a lazy Adam step must do to one item table at least: for each of the batch's
B * (L + 1) lookups (ids drawn uniformly, as `step_throughput.py`'s random batches), read the
row's value, moments and count, apply `dare_jax.optim.LazyAdam`'s rule and write them back:
random accesses to three `[rows, dim]` float32 arrays and an int32 `[rows]` count array.
This script compiles that loop from C (`cc -O3 -march=native`, the row width fixed at
compile time) in the most favourable form we know for this hardware, and times it: the arrays
in 2 MiB pages (madvise), the rows of the lookup 16 positions ahead prefetched
(`__builtin_prefetch`), bias corrections from a table, ids in batch order and, for comparison,
sorted (a sort that the step would also have to pay for; not included). It merges no
duplicate ids (uniform ids over millions of rows have few), so it is a floor for the time,
not an implementation: the ratio of XLA's lazy update to it is what is left to gain, and
`batch / (frozen-table step + 2 x floor)` bounds DARE's lazy step (two item tables per step).

Prints, per table size and id order, the median milliseconds per pass over `--repeats`
passes, and the load average before and after. The compiled loop runs in a child process,
with this process's environment (the allocator setting included; it allocates its arrays
itself, in 2 MiB pages). Exits 2 without a C compiler.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static void *huge_zeros(size_t bytes) {
    size_t page = (size_t)1 << 21;
    bytes = (bytes + page - 1) / page * page;
    void *memory = aligned_alloc(page, bytes);
    if (!memory) { perror("aligned_alloc"); exit(1); }
    madvise(memory, bytes, MADV_HUGEPAGE);
    memset(memory, 0, bytes);
    return memory;
}

int main(int argc, char **argv) {
    long rows = atol(argv[1]);
    long lookups = atol(argv[2]);
    int repeats = atoi(argv[3]), sorted = atoi(argv[4]);
    const int dim = DIM;  /* a compile-time constant: the row loop vectorises */
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    /* 1 - b^k for every count a pass can reach, looked up instead of computed per row */
    float *bc1_of = malloc((repeats + 2) * 4), *bc2_of = malloc((repeats + 2) * 4);
    for (int k = 0; k <= repeats + 1; k++) {
        bc1_of[k] = (float)-expm1(k * log(0.9));
        bc2_of[k] = (float)-expm1(k * log(0.999));
    }
    float *p = huge_zeros(rows * dim * 4), *m = huge_zeros(rows * dim * 4);
    float *v = huge_zeros(rows * dim * 4);
    int *count = huge_zeros(rows * 4);
    int *ids = malloc(lookups * 4);
    float *grad = malloc(lookups * dim * 4);
    srand(1);
    for (long i = 0; i < lookups; i++) {
        ids[i] = (int)((((long)rand() << 31) ^ rand()) % rows);
        for (int k = 0; k < dim; k++) grad[i * dim + k] = 1e-3f * (float)(rand() % 2001 - 1000);
    }
    if (sorted) qsort(ids, lookups, sizeof(int), by_value);
    for (int r = 0; r < repeats; r++) {
        double start = now();
        for (long i = 0; i < lookups; i++) {
            if (i + 16 < lookups) {
                long ahead = (long)ids[i + 16];
                __builtin_prefetch(p + ahead * dim, 1);
                __builtin_prefetch(m + ahead * dim, 1);
                __builtin_prefetch(v + ahead * dim, 1);
                __builtin_prefetch(count + ahead, 1);
            }
            long row = ids[i];
            int k = ++count[row];
            float bc1 = bc1_of[k], bc2 = bc2_of[k];
            float *restrict pr = p + row * dim, *restrict mr = m + row * dim;
            float *restrict vr = v + row * dim;
            const float *restrict g = grad + i * dim;
            for (int j = 0; j < dim; j++) {
                float mj = (1 - b1) * g[j] + b1 * mr[j];
                float vj = (1 - b2) * (g[j] * g[j]) + b2 * vr[j];
                mr[j] = mj;
                vr[j] = vj;
                pr[j] -= lr * ((mj / bc1) / (sqrtf(vj / bc2) + eps));
            }
        }
        printf("%.3f\n", 1e3 * (now() - start));
    }
    return 0;
}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="4068791,12000000,30000000", help="table sizes")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler")
    args = parser.parse_args(argv)
    if shutil.which(args.cc) is None:
        print(f"no C compiler {args.cc!r} on PATH (--cc)", file=sys.stderr)
        return 2
    lookups = args.batch * (args.length + 1)
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "floor.c", Path(tmp) / "floor"
        source.write_text(SOURCE)
        subprocess.run(
            [args.cc, "-O3", "-march=native", f"-DDIM={args.dim}", "-o", str(binary), str(source),
             "-lm"],
            check=True,
        )
        print(f"{lookups:,} lookups of dim {args.dim} per pass, {args.repeats} passes; "
              f"load average before {os.getloadavg()[0]:.2f}", flush=True)
        for rows in (int(r) for r in args.rows.split(",")):
            for sorted_ids in (0, 1):
                out = subprocess.run(
                    [str(binary), str(rows), str(lookups), str(args.repeats), str(sorted_ids)],
                    check=True, capture_output=True, text=True,
                ).stdout.split()
                times = sorted(float(t) for t in out)
                order = "sorted ids" if sorted_ids else "batch order"
                print(f"  {rows:>12,} rows, {order:11s}: median {times[len(times) // 2]:7.1f} ms "
                      f"per pass (min {times[0]:.1f})", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
