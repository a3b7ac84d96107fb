// The world's map on a canvas: roads, buildings, trucks where the last tick left them,
// packages by status. Kept up to date from world.snapshot and the map/simulation signals.

export const STATUS_COLOURS = { waiting: "#d98f00", in_transit: "#2f6fde", delivered: "#1f9d55" };
const TRUCK_COLOURS = ["#e4572e", "#17bebb", "#76b041", "#7d5ba6", "#ffc914", "#2e86ab", "#f46197", "#3f3f3f"];

export class WorldModel {
  constructor() {
    this.nodes = new Map();
    this.edges = new Map();
    this.agents = new Map();
    this.packages = new Map();
    this.meta = {};
  }

  /** Replace everything with the slices of a world.snapshot. */
  load(slices) {
    this.nodes.clear(); this.edges.clear(); this.agents.clear(); this.packages.clear();
    for (const [key, value] of Object.entries(slices.map || {})) {
      if (key.startsWith("node:")) this.nodes.set(value.id, value);
      else if (key.startsWith("edge:")) this.edges.set(value.id, value);
    }
    for (const [key, value] of Object.entries(slices.simulation || {})) {
      if (key.startsWith("agent:")) this.agents.set(value.id, value);
      else if (key.startsWith("package:")) this.packages.set(value.id, value);
      else if (key === "meta") this.meta = value;
    }
  }

  /** Apply one signal; true when it changed something, "reload" when only a fresh
   * snapshot can tell what it did. */
  apply(name, d) {
    switch (name) {
      case "map.node_added": case "map.node_updated": this.nodes.set(d.node.id, d.node); return true;
      case "map.node_removed":
        this.nodes.delete(d.id);
        for (const e of d.removed_edges || []) this.edges.delete(typeof e === "string" ? e : e.id);
        return true;
      case "map.edge_added": this.edges.set(d.edge.id, d.edge); return true;
      case "map.edge_removed": this.edges.delete(d.id); return true;
      case "simulation.agent_added": this.agents.set(d.agent.id, d.agent); return true;
      case "simulation.agent_removed": this.agents.delete(d.id); return true;
      case "simulation.package_added": this.packages.set(d.package.id, d.package); return true;
      case "simulation.package_cancelled": this.packages.delete(d.id); return true;
      case "simulation.started": this.meta = { ...this.meta, running: true, tick: d.tick, tick_hz: d.tick_hz }; return true;
      case "simulation.stopped": this.meta = { ...this.meta, running: false, tick: d.tick }; return true;
      case "simulation.updated": this.meta = { ...this.meta, ...d.metadata }; return true;
      case "simulation.ticked":
        this.meta = { ...this.meta, tick: d.tick, current_day: d.current_day };
        for (const m of d.moved || []) {
          const a = this.agents.get(m.id);
          if (a) Object.assign(a, { node: m.node, edge: m.edge, progress: m.progress });
        }
        for (const p of d.packages || []) {
          const pkg = this.packages.get(p.id);
          if (pkg) Object.assign(pkg, { status: p.status, carried_by: p.carried_by });
        }
        return true;
      case "map.imported": case "simulation.state_imported": return "reload";
      default: return false;
    }
  }

  /** Where an agent is drawn: on its node, or along its edge. */
  position(agent) {
    if (agent.edge && this.edges.has(agent.edge)) {
      const e = this.edges.get(agent.edge);
      const a = this.nodes.get(e.from), b = this.nodes.get(e.to);
      if (a && b) {
        const t = Math.max(0, Math.min(1, (agent.progress || 0) / (e.length || 1)));
        return [a.x + (b.x - a.x) * t, a.y + (b.y - a.y) * t];
      }
    }
    const n = this.nodes.get(agent.node);
    return n ? [n.x, n.y] : null;
  }
}

export class MapView {
  constructor(canvas, model) {
    this.canvas = canvas;
    this.model = model;
    this.highlight = null; // a colour for the trucks' outline (the player's)
    this._queued = false;
  }

  /** Draw on the next animation frame (many signals, one drawing). */
  update() {
    if (this._queued) return;
    this._queued = true;
    requestAnimationFrame(() => { this._queued = false; this.draw(); });
  }

  draw() {
    const c = this.canvas, m = this.model;
    const dpr = globalThis.devicePixelRatio || 1;
    const w = c.clientWidth || 600, h = c.clientHeight || 400;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    if (!m.nodes.size) {
      g.fillStyle = "#6b7385"; g.font = "14px system-ui"; g.textAlign = "center";
      g.fillText("the map is empty", w / 2, h / 2);
      return;
    }
    let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
    for (const n of m.nodes.values()) {
      minX = Math.min(minX, n.x); maxX = Math.max(maxX, n.x); minY = Math.min(minY, n.y); maxY = Math.max(maxY, n.y);
    }
    const pad = 28, span = Math.max(maxX - minX, maxY - minY, 1e-9);
    const scale = Math.min((w - 2 * pad) / (maxX - minX || span), (h - 2 * pad) / (maxY - minY || span));
    const ox = (w - (maxX - minX) * scale) / 2, oy = (h - (maxY - minY) * scale) / 2;
    const P = (x, y) => [ox + (x - minX) * scale, oy + (y - minY) * scale];
    const big = m.nodes.size > 2000;
    g.strokeStyle = "#c5ccd8"; g.lineWidth = big ? 0.5 : 2; g.beginPath();
    for (const e of m.edges.values()) {
      const a = m.nodes.get(e.from), b = m.nodes.get(e.to);
      if (!a || !b) continue;
      const [x1, y1] = P(a.x, a.y), [x2, y2] = P(b.x, b.y);
      g.moveTo(x1, y1); g.lineTo(x2, y2);
    }
    g.stroke();
    for (const n of m.nodes.values()) {
      const [x, y] = P(n.x, n.y);
      if (n.building) {
        g.fillStyle = "#4b5568"; g.fillRect(x - 6, y - 6, 12, 12);
        if (!big) { g.fillStyle = "#6b7385"; g.font = "11px system-ui"; g.textAlign = "left"; g.fillText(n.building.type || "", x + 8, y - 6); }
      } else {
        g.fillStyle = "#9aa3b2"; g.beginPath(); g.arc(x, y, big ? 1 : 3.5, 0, Math.PI * 2); g.fill();
      }
    }
    const perNode = new Map();
    for (const p of m.packages.values()) {
      if (p.status === "in_transit") continue; // drawn with its truck
      const at = p.status === "delivered" ? p.destination : p.origin;
      const k = perNode.get(at) || 0; perNode.set(at, k + 1);
      const n = m.nodes.get(at);
      if (!n || k > 12) continue;
      const [x, y] = P(n.x, n.y);
      g.fillStyle = STATUS_COLOURS[p.status] || "#999";
      g.beginPath(); g.arc(x - 9 + (k % 4) * 6, y + 10 + Math.floor(k / 4) * 6, 2.6, 0, Math.PI * 2); g.fill();
    }
    let i = 0;
    for (const a of m.agents.values()) {
      const pos = m.position(a);
      const colour = TRUCK_COLOURS[i++ % TRUCK_COLOURS.length];
      if (!pos) continue;
      const [x, y] = P(pos[0], pos[1]);
      g.fillStyle = colour; g.strokeStyle = this.highlight || "#1d2330"; g.lineWidth = 1.5;
      g.beginPath(); g.roundRect ? g.roundRect(x - 7, y - 5, 14, 10, 3) : g.rect(x - 7, y - 5, 14, 10); g.fill(); g.stroke();
      if ((a.cargo || []).length) { g.fillStyle = STATUS_COLOURS.in_transit; g.beginPath(); g.arc(x, y, 2.5, 0, Math.PI * 2); g.fill(); }
      if (!big) { g.fillStyle = "#1d2330"; g.font = "11px system-ui"; g.textAlign = "center"; g.fillText(a.id, x, y - 8); }
    }
  }
}

export function legend(el) {
  el.innerHTML = Object.entries(STATUS_COLOURS)
    .map(([k, c]) => `<span><span class="dot" style="background:${c}"></span>${k.replace("_", " ")}</span>`).join("")
    + `<span><span class="dot" style="background:#4b5568;border-radius:2px"></span>building</span>`;
}
