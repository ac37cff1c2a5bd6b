"""Launching pdserve: the `pdserve` CLI, Ray placement of the workers, the gateway process."""
