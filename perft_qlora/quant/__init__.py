"""Loading MoE models with every big weight in NF4: family table, streaming loader, NF4 storage and experts."""
