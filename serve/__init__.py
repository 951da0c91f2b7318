"""Online serving of learned tokens: a Ray Serve application (classify, retrieve, generate, GAIR).

``settings`` (what the app is configured with), ``state`` (a registry version made ready to serve; no
Ray), ``api`` (the HTTP contract: request and response models, error shape), ``deployments`` (the Ray
Serve deployments), ``ingress`` (the FastAPI routes), ``app`` (builds the application, also the
``import_path`` of ``serve deploy`` config files in ``serve/configs/``).
"""
