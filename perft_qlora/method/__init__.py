"""The PERFT method: config, variants, routers, adapter experts, the routed block, attach, losses, adapter files."""
