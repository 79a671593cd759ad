"""`kind-dit serve`: a local HTTP server that holds the learngene once and the tailors on demand.

- `cache`: the KIND model whose tailor bank rows are cache slots, and the LRU cache of tailors
  (loaded from the parts directory on first use, sha256-checked, never evicted while in use);
- `draw`: one batched sampling run for samples of many classes, computed so that each sample's
  result does not depend on what else shares the batch;
- `batcher`: the dynamic batcher (an asyncio queue and one worker that runs the forward in a thread);
- `app`: the FastAPI app (JSON API and the web page `page.html`); `server`: binding and running it.
"""
