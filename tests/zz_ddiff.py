def ddiff(a, b, path="", out=None, limit=10):
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a: out.append(f"{path}.{k}: missing in synced")
            elif k not in b: out.append(f"{path}.{k}: extra in synced")
            else: ddiff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: len {len(a)} != {len(b)}: {[x.get('id') if isinstance(x, dict) else x for x in a]} vs {[x.get('id') if isinstance(x, dict) else x for x in b]}")
        else:
            for i, (x, y) in enumerate(zip(a, b)): ddiff(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")
    return out
