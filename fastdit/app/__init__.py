"""`fastdit app`: a local web page to sample from the digits demo, a local checkpoint or the released
DiT-XL/2 and SiT-XL/2 weights.

Only `page` imports Gradio (the optional extra `fastdit[app]`); the rest is plain Python, so what the page
does can be tested, and reused, without a browser.
"""
