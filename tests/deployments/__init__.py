"""Real workers on each kind of deployment: Redis flavours, SQL databases, rpc:// + a store."""
