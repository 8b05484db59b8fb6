// The `require` machinery, compiled into a context only when its code first calls
// `require` (most handlers and workers never do, and every fresh context would pay
// for parsing it). Called once with the loader's natives and compat.js's `dirname`;
// returns `makeRequire(from)`.
(function (native, dirname) {
  "use strict";
  const show = (v) => {
    try {
      const s = typeof v === "string" ? JSON.stringify(v) : String(v);
      return s.length > 80 ? s.slice(0, 77) + "..." : s;
    } catch (e) {
      return typeof v;
    }
  };
  // Modules loaded in this context, by app path. A context never outlives its
  // deployment (a deploy replaces it), so neither does this cache.
  const cache = new Map();
  // `from` + spec → the app path it resolved to, so a hit needs no store read.
  const resolved = new Map();

  // The app path `spec` names, seen from file `from`; only ./ and ../ paths inside
  // the app, each refusal naming the path.
  function resolveBase(spec, from) {
    const where = "require(" + show(spec) + ") in " + from;
    if (typeof spec !== "string" || spec === "") {
      throw new TypeError(where + ": give the path of one of the app's files, e.g. require('./lib/util.js')");
    }
    if (spec.startsWith("node:")) {
      throw new Error(where + ": Node's built-in modules are not available in fazt; only the app's own .js and .json files can be required");
    }
    if (spec.startsWith("/")) {
      throw new Error(where + ": absolute paths are not allowed; use a path relative to " + from + ", such as './lib/x.js' or '../lib/x.js'");
    }
    if (!spec.startsWith("./") && !spec.startsWith("../")) {
      throw new Error(where + ": packages are not available in fazt; require the app's own files with a relative path ('./x' or '../lib/x')");
    }
    const parts = dirname(from) === "" ? [] : dirname(from).split("/");
    const segs = spec.split("/");
    for (let i = 0; i < segs.length; i++) {
      const seg = segs[i];
      if (seg === "." || (seg === "" && i === segs.length - 1)) continue;
      if (seg === "" || seg.indexOf("\\") >= 0) {
        throw new Error(where + ": malformed path");
      }
      if (seg === "..") {
        if (parts.length === 0) throw new Error(where + ": the path leads outside the app");
        parts.pop();
      } else {
        parts.push(seg);
      }
    }
    if (parts.length === 0) throw new Error(where + ": the path names the app's root folder, not a file");
    return { base: parts.join("/"), dir: spec.endsWith("/") };
  }

  function load(spec, from) {
    const key = from + "\u0000" + spec;
    let path = resolved.get(key);
    if (path === undefined) {
      const { base, dir } = resolveBase(spec, from);
      const explicit = base.endsWith(".js") || base.endsWith(".json");
      const candidates = dir ? [base + "/index.js", base + "/index.json"]
        : explicit ? [base] : [base + ".js", base + ".json", base + "/index.js", base + "/index.json"];
      let source = null;
      for (let i = 0; i < candidates.length; i++) {
        if (cache.has(candidates[i])) { path = candidates[i]; break; }
        source = native.readModule(candidates[i]);
        if (source !== null) { path = candidates[i]; break; }
      }
      if (path === undefined) {
        const e = new Error("require(" + show(spec) + ") in " + from + ": no file " +
          candidates.join(" or ") + " in this app" +
          (explicit || dir ? "" : " (only .js and .json files can be required)"));
        e.code = "MODULE_NOT_FOUND";
        throw e;
      }
      resolved.set(key, path);
      if (!cache.has(path)) return evaluate(path, source);
    }
    const hit = cache.get(path);
    if (hit !== undefined) return hit.exports;
    return evaluate(path, native.readModule(path));
  }

  // Runs a module's body once; it is cached first, so a circular require sees the
  // exports as they are so far (as in Node). A body that throws is not cached.
  function evaluate(path, source) {
    if (source === null) throw new Error("require: " + path + " disappeared from the app while loading");
    const module = { id: path, filename: path, loaded: false, exports: {} };
    cache.set(path, module);
    try {
      if (path.endsWith(".json")) {
        try {
          module.exports = JSON.parse(source);
        } catch (e) {
          throw new SyntaxError(path + ": invalid JSON: " + e.message);
        }
      } else {
        const factory = native.compile(path, source);
        factory.bind(module.exports)(module.exports, makeRequire(path), module, path, dirname(path));
      }
    } catch (e) {
      cache.delete(path);
      throw e;
    }
    module.loaded = true;
    return module.exports;
  }

  function makeRequire(from) {
    const require = function require(spec) {
      return load(spec, from);
    };
    return require;
  }

  return makeRequire;
});
