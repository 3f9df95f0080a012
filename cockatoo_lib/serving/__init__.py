"""Online classification: the champion behind KServe's protocols, following the registry.

batching (concurrent requests gathered into batches that one model version scores), server
(`cockatoo serve`: a kserve Model and ModelServer, request checks, metrics, the alias follower),
deploy (`cockatoo deploy`: the KServe InferenceService that runs it on a cluster).
"""
