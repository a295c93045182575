"""Kubernetes: manifests read beside the policies, ``meshc inject``, ``meshc manifests``.

Kept apart from the policy kinds: ``objects`` recognises and types the few Kubernetes objects
meshc reads (parse stage), ``derive`` turns them into catalog, gateway and route documents (one
pure function over the whole repo), ``inject`` and ``manifests`` write YAML for ``kubectl``.
"""
