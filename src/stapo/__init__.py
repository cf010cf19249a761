"""stapo: Spurious-Token-Aware Policy Optimization for RL with verifiable math rewards.

`stapo.core` holds the math (pure PyTorch). Rewards and data sit on top of it, the engines
(TRL for one node, verl for clusters) on top of those, and the `stapo` CLI on top of everything.
"""

__version__ = "0.1.0"
