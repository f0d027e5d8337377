"""Measure the speed of the engine's hot paths on this machine, against the machine's own bound.

`prime benchmark search` scores random polar references x particles through the
production path (all in-plane angles of every pair) and prints one JSON line:
pairs_per_second, the bound measured in the same run (1 / (t_mm + t_fft): the
pair's matrix work at the rate of a large complex64 matrix multiply plus one real
inverse FFT of length n_rot at the batched FFT rate), their ratio, and the
transform work per pair with and without the Friedel saving. Medians of --repeats runs.
"""

import json


def add_args(parser):
    parser.add_argument("what", choices=["search"], help="the hot path to measure")
    parser.add_argument("--box", type=int, default=128, help="image box in pixels (default 128)")
    parser.add_argument("--rings", type=int, default=48, help="number of polar rings (Fourier pixels, default 48)")
    parser.add_argument("--nrot", type=int, default=256, help="in-plane angles per ring, even (default 256)")
    parser.add_argument("--refs", type=int, default=1024, help="reference directions scored (default 1024)")
    parser.add_argument("--particles", type=int, default=512, help="particles scored (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per figure; medians are reported (default 5)")


def main(args):
    from prime_plugin.core.errors import PrimeInputError
    from prime_plugin.core.throughput import search_benchmark

    for name in ("box", "refs", "particles", "repeats"):
        if getattr(args, name) < 1:
            raise PrimeInputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.nrot % 2 or args.nrot < 4:
        raise PrimeInputError(f"--nrot must be even and at least 4 (Friedel half rings), got {args.nrot}")
    if args.rings < 1 or args.rings >= args.box // 2:
        raise PrimeInputError(f"--rings must be between 1 and {args.box // 2 - 1} for a box of {args.box}")
    figures = search_benchmark(args.box, args.rings, args.nrot, args.refs, args.particles, args.repeats)
    print(json.dumps(figures))
    return 0
