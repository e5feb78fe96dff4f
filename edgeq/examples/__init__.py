"""Worked examples of the public API (`edgeq.compress`); `mnist` is the one `make export` builds."""
