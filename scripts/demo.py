"""Compares GRASS, LISA and full fine-tuning on a toy residual MLP (CPU, seconds).

  python scripts/demo.py [--steps 300] [--num-active 2] [--period 10]
"""

import argparse

from toy_problem import run_toy


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--num-active", type=int, default=2)
  ap.add_argument("--period", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  print(f"{'strategy':<8} {'initial loss':>12} {'final loss':>11} {'seconds':>8}")
  for name in ("full", "lisa", "grass"):
    r = run_toy(name, steps=args.steps, num_active=args.num_active, period=args.period, seed=args.seed)
    print(f"{name:<8} {r['initial_loss']:>12.4f} {r['final_loss']:>11.4f} {r['seconds']:>8.2f}")


if __name__ == "__main__":
  main()
