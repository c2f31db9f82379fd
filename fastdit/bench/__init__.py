"""`fastdit bench train|sample`: one step of training or guided sampling, one process per row, each row
as a ratio to a reference row that computes what the official DiT code computes."""
