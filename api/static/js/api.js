// The JSON API client the pages share: bearer token, readable errors, and commands whose outcome
// arrives later (202 + Location: /commands/{id}) followed to the end.
//
// The token: `tierflow up` (and `tierflow demo --keep`) print a one-time address, /ui/?token=..., as Jupyter
// does. The page keeps the token in sessionStorage (this tab only, gone when it closes), removes it from the
// address bar and history at once, and sends it as `Authorization: Bearer` on every request: a header, not a
// cookie, so no other site can make the browser send it (CSRF), and cookies do not separate ports on 127.0.0.1.

const TOKEN_KEY = "tierflow.apiToken";

function adoptTokenFromAddress() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token === null) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete("token");
  const query = params.toString();
  history.replaceState(history.state, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}

adoptTokenFromAddress();
localStorage.removeItem(TOKEN_KEY); // earlier versions kept it for good; a tab's session is enough

export class ApiError extends Error {
  constructor(message, { status = 0, code = "error", field = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Headers of every request to the API: JSON, and the bearer token when the page has one. */
export function authHeaders(extra = {}) {
  const headers = { Accept: "application/json", ...extra };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

const STATUS_OF_CODE = { invalid: 422, not_found: 404, conflict: 409, unauthorized: 401, forbidden: 403 };

function errorFrom(status, data, fallback) {
  const e = data && data.error;
  if (e && e.message) {
    let message = e.message;
    if (status === 401) {
      message = "This API needs its token. Open the address `tierflow up` printed (…/ui/?token=…), or enter " +
        "the token (`tierflow status --json`) in the field at the top right.";
    }
    return new ApiError(message, { status, code: e.code, field: e.field });
  }
  return new ApiError(fallback, { status });
}

async function send(method, path, body) {
  const headers = authHeaders();
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload });
  } catch (err) {
    throw new ApiError(`Cannot reach the API (${err.message}). Is \`tierflow up\` running?`);
  }
  const type = res.headers.get("Content-Type") || "";
  const data = type.includes("application/json") ? await res.json().catch(() => null) : null;
  if (!res.ok) throw errorFrom(res.status, data, `${method} ${path} failed: HTTP ${res.status} ${res.statusText}`);
  return { status: res.status, data, location: res.headers.get("Location") };
}

export async function get(path) {
  return (await send("GET", path)).data;
}

export const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const RESOURCE_OF_AGGREGATE = {
  model: "/models/", configuration: "/configurations/", deployment: "/deployments/",
  datasource: "/datasources/", inference: "/inferences/",
};

/** Follow a command to its outcome: the resource it produced, or an ApiError with the rejection. */
export async function outcome(location, { method = "POST", timeoutMs = 120000 } = {}) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const r = await send("GET", location);
    if (r.status === 200 && r.data && r.data.status) {
      const o = r.data;
      if (o.status === "rejected") {
        const reason = o.reason || {};
        throw new ApiError(reason.message || "the command was rejected", {
          status: STATUS_OF_CODE[reason.code] || 422, code: reason.code || "invalid", field: reason.field || null,
        });
      }
      const [kind, id] = String(o.aggregate || "").split(":");
      if (method !== "DELETE" && RESOURCE_OF_AGGREGATE[kind]) {
        try {
          return await get(RESOURCE_OF_AGGREGATE[kind] + id);
        } catch {
          return o;
        }
      }
      return o;
    }
    await delay(400);
  }
  throw new ApiError(`No outcome yet after ${Math.round(timeoutMs / 1000)} s; check ${location} later.`);
}

/** A write: the resource (201/200), a rejection as ApiError, or the outcome of a slow command (202). */
export async function write(method, path, body) {
  const r = await send(method, path, body);
  if (r.status === 202 && r.location) return outcome(r.location, { method });
  return r.data;
}

export const post = (path, body) => write("POST", path, body);
export const put = (path, body) => write("PUT", path, body);
export const del = (path) => write("DELETE", path);

/** Every item of a paged listing (the API pages by 1000 at most). */
export async function all(path) {
  const sep = path.includes("?") ? "&" : "?";
  const items = [];
  for (let offset = 0; ; offset += 1000) {
    const page = await get(`${path}${sep}limit=1000&offset=${offset}`);
    items.push(...page.items);
    if (items.length >= page.total || page.items.length === 0) return items;
  }
}
