// Simulates visitors in a shopping mall. Every second it moves the mall clock on by
// five minutes, lets each zone's crowd drift towards what is usual for that time of
// day, and broadcasts the figures on the `mall` channel.
//
// The state is checkpointed every tick, so a daemon restarted by the server resumes
// where it was. A simulator stopped by its idle timeout is a finished job, and the
// next /api/start spawns a new one with an empty checkpoint: that one picks the state
// up from the app's key-value store instead.

const OPEN = 9 * 60; // 09:00, in minutes of the day
const CLOSE = 22 * 60; // 22:00
const MINUTES_PER_TICK = 5;

// capacity: most people a zone holds; base: share present at any open hour;
// peaks: [hour, width in hours, extra share] bumps over the day.
const ZONES = [
  { id: "entrance", capacity: 160, base: 0.15, peaks: [[11, 1.5, 0.5], [17.5, 1.5, 0.6]] },
  { id: "food-court", capacity: 420, base: 0.1, peaks: [[12.75, 1, 0.8], [19.25, 1.2, 0.6]] },
  { id: "fashion", capacity: 320, base: 0.2, peaks: [[15.5, 2, 0.6], [18.5, 1.5, 0.3]] },
  { id: "electronics", capacity: 220, base: 0.15, peaks: [[16.5, 2.5, 0.6]] },
  { id: "groceries", capacity: 260, base: 0.25, peaks: [[10.5, 1.5, 0.3], [18, 1.2, 0.6]] },
  { id: "cinema", capacity: 380, base: 0.05, peaks: [[14.5, 1, 0.3], [20.5, 1.2, 0.9]] },
];

// A first start opens the doors at 10:30, with the crowds usual for that hour.
function fresh() {
  const minute = 10 * 60 + 30;
  const zones = {};
  for (const z of ZONES) zones[z.id] = Math.round(z.capacity * usual(z, minute));
  return { tick: 0, minute: minute, zones: zones };
}

// The share of a zone's capacity that is usual at `minute`, ramping up after opening
// and down before closing.
function usual(zone, minute) {
  const hour = minute / 60;
  let share = zone.base;
  for (const [at, width, extra] of zone.peaks) {
    const d = (hour - at) / width;
    share += extra * Math.exp(-0.5 * d * d);
  }
  const ramp = Math.min(1, (minute - OPEN) / 60, (CLOSE - minute) / 45);
  return Math.max(0, Math.min(1, share)) * Math.max(0, ramp);
}

function step(state) {
  const next = { tick: state.tick + 1, minute: state.minute + MINUTES_PER_TICK, zones: {} };
  if (next.minute >= CLOSE) next.minute = OPEN; // the next day opens at once
  for (const z of ZONES) {
    const now = Number(state.zones[z.id]) || 0;
    const target = z.capacity * usual(z, next.minute);
    const noise = (Math.random() - 0.5) * z.capacity * 0.05;
    const n = Math.round(now + (target - now) * 0.25 + noise);
    next.zones[z.id] = Math.max(0, Math.min(z.capacity, n));
  }
  return next;
}

function clock(minute) {
  const pad = (n) => String(n).padStart(2, "0");
  return pad(Math.floor(minute / 60)) + ":" + pad(minute % 60);
}

module.exports = function (job) {
  let state = job.getCheckpoint() || fazt.storage.kv.get("state") || fresh();
  job.log("simulator starting at tick " + state.tick + " (" + clock(state.minute) + ")");
  while (!job.cancelled) {
    state = step(state);
    const zones = ZONES.map((z) => ({ id: z.id, visitors: state.zones[z.id], capacity: z.capacity }));
    fazt.realtime.broadcast("mall", {
      tick: state.tick,
      time: clock(state.minute),
      total: zones.reduce((sum, z) => sum + z.visitors, 0),
      zones: zones,
    });
    // Progress is how far the mall's day has got, opening to closing.
    job.progress(((state.minute - OPEN) / (CLOSE - OPEN)) * 100);
    job.checkpoint(state);
    fazt.storage.kv.set("state", state);
    job.sleep(1000);
  }
  job.log("simulator cancelled at tick " + state.tick);
  return { tick: state.tick };
};
