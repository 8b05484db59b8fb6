// Handler contexts only, after compat.js: upstream fazt's `respond` helper.
(function () {
  "use strict";
  const status = (s) => {
    if (typeof s !== "number" || !Number.isInteger(s) || s < 100 || s > 599) {
      throw new TypeError("respond: the status must be a whole number from 100 to 599, not " + String(s));
    }
    return s;
  };
  // respond(body), respond(status), respond(status, body[, headers]).
  function respond(a, b, c) {
    const n = arguments.length;
    if (n === 0) return { status: 200, body: null };
    if (n === 1) return typeof a === "number" ? { status: status(a), body: null } : { status: 200, body: a };
    const r = { status: status(a), body: b === undefined ? null : b };
    if (c !== undefined) {
      if (c === null || typeof c !== "object") throw new TypeError("respond: headers must be an object");
      r.headers = c;
    }
    return r;
  }
  Object.defineProperty(globalThis, "respond", { value: respond, writable: true, configurable: true });
});
