"""pdserve: disaggregated prefill/decode LLM serving. Subpackages: `engine` (model execution),
`kernels` (Triton), `proto` (the wire contract), `kvtransfer`, `prefill_worker`, `decode_worker`,
`router` (the OpenAI gateway), `deploy` (Ray launch and operations), `bench`."""
