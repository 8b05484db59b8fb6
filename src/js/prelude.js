// Runs once in every fresh context, before any user code. It builds the public `fazt`,
// `console` and (in workers) `job` objects on top of the hidden native `__host`, then
// removes `__host` so user code only sees the documented API.
(function (host, isJob) {
  "use strict";
  const define = (obj, name, value) =>
    Object.defineProperty(obj, name, { value, writable: true, configurable: true, enumerable: false });

  const fmt = (args) => args.map((a) => {
    if (typeof a === "string") return a;
    if (a instanceof Error) return String(a);
    try { const s = JSON.stringify(a); return s === undefined ? String(a) : s; } catch (e) { return String(a); }
  }).join(" ");
  const consoleObj = {};
  for (const level of ["log", "info", "warn", "error", "debug"]) {
    define(consoleObj, level, function () { host.log(level, fmt(Array.prototype.slice.call(arguments))); });
  }
  globalThis.console = consoleObj;

  const parse = (s) => (s === null || s === undefined ? null : JSON.parse(s));
  const kv = Object.freeze({
    get: (key) => parse(host.kvGet(key)),
    set: (key, value, ttlMs) => {
      const s = JSON.stringify(value);
      if (s === undefined) throw new TypeError("fazt.storage.kv.set: value must be JSON-serialisable");
      host.kvSet(key, s, ttlMs);
    },
    delete: (key) => host.kvDelete(key),
    list: (prefix) => host.kvList(prefix === undefined ? "" : prefix),
  });

  const worker = Object.freeze({
    spawn: (path, opts) => host.workerSpawn(path, opts === undefined ? {} : opts),
    get: (id) => host.workerGet(id),
    list: (filter) => host.workerList(filter === undefined ? {} : filter),
    cancel: (id) => host.workerCancel(id),
    wait: (id, opts) => host.workerWait(id, opts === undefined ? {} : opts),
  });

  const realtime = Object.freeze({
    broadcast: (channel, data) => host.rtBroadcast(channel, JSON.stringify(data === undefined ? null : data)),
    broadcastAll: (data) => host.rtBroadcastAll(JSON.stringify(data === undefined ? null : data)),
    count: (channel) => host.rtCount(channel),
    subscribers: (channel) => host.rtSubscribers(channel),
  });

  globalThis.fazt = Object.freeze({
    app: Object.freeze({ name: host.appName }),
    storage: Object.freeze({ kv }),
    worker,
    realtime,
  });

  if (isJob) {
    // A worker context is reused for the next job of the same app, so the `job`
    // object is made per run; the natives answer for the job running now.
    globalThis.__fazt_make_job = function () {
      const info = host.jobInfo();
      const job = {};
      Object.defineProperty(job, "id", { value: info[0], enumerable: true });
      Object.defineProperty(job, "attempt", { value: info[1], enumerable: true });
      Object.defineProperty(job, "data", { value: parse(info[2]), enumerable: true, writable: true });
      Object.defineProperty(job, "cancelled", { get: () => host.jobCancelled(), enumerable: true });
      define(job, "progress", (n) => host.jobProgress(n));
      define(job, "log", function () { host.log("job", fmt(Array.prototype.slice.call(arguments))); });
      define(job, "checkpoint", (value) => {
        const s = JSON.stringify(value);
        if (s === undefined) throw new TypeError("job.checkpoint: value must be JSON-serialisable");
        host.jobCheckpoint(s);
      });
      define(job, "getCheckpoint", () => parse(host.jobGetCheckpoint()));
      define(job, "sleep", (ms) => host.jobSleep(ms));
      return Object.freeze(job);
    };
  }
  delete globalThis.__host;
  delete globalThis.__isJob;
})(globalThis.__host, globalThis.__isJob);
