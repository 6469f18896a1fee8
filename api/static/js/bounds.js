// One-sided exact binomial bounds (Clopper-Pearson), as the decider computes them (streams/exits.py), so that
// the page can say which frontier point a target selects before the target is sent.
//
// The bounds are quantiles of beta distributions: upper(k, n) = the 1 - alpha quantile of Beta(k + 1, n - k),
// lower(k, n) = the alpha quantile of Beta(k, n - k + 1). Every argument here is an integer, so the log-beta
// function comes from a table of log-factorials; the regularized incomplete beta function from its continued
// fraction (evaluated by the modified Lentz method); its inverse by bisection, which cannot leave [0, 1] and
// reaches double precision in 64 halvings.

const logFactorials = [0];

function logFactorial(m) {
  for (let i = logFactorials.length; i <= m; i += 1) logFactorials.push(logFactorials[i - 1] + Math.log(i));
  return logFactorials[m];
}

/** log B(a, b) for positive integers a, b: log((a-1)! (b-1)! / (a+b-1)!). */
function logBeta(a, b) {
  return logFactorial(a - 1) + logFactorial(b - 1) - logFactorial(a + b - 1);
}

/** The continued fraction of I_x(a, b): 1 / (1 + d1 / (1 + d2 / ...)), fast where x < (a + 1) / (a + b + 2). */
function betaFraction(a, b, x) {
  const tiny = 1e-300;
  let c = 1;
  let d = 1 - ((a + b) * x) / (a + 1);
  d = 1 / (Math.abs(d) < tiny ? tiny : d);
  let f = d;
  for (let m = 1; m < 20000; m += 1) {
    // The even step d_2m, then the odd step d_2m+1.
    const even = (m * (b - m) * x) / ((a + 2 * m - 1) * (a + 2 * m));
    d = 1 + even * d;
    d = 1 / (Math.abs(d) < tiny ? tiny : d);
    c = 1 + even / c;
    if (Math.abs(c) < tiny) c = tiny;
    f *= c * d;
    const odd = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1));
    d = 1 + odd * d;
    d = 1 / (Math.abs(d) < tiny ? tiny : d);
    c = 1 + odd / c;
    if (Math.abs(c) < tiny) c = tiny;
    const step = c * d;
    f *= step;
    if (Math.abs(step - 1) < 1e-15) return f;
  }
  return f;
}

/** The regularized incomplete beta function I_x(a, b), integer a, b >= 1. */
export function betaInc(a, b, x) {
  if (x <= 0) return 0;
  if (x >= 1) return 1;
  const front = Math.exp(a * Math.log(x) + b * Math.log1p(-x) - logBeta(a, b));
  if (x < (a + 1) / (a + b + 2)) return (front * betaFraction(a, b, x)) / a;
  return 1 - (front * betaFraction(b, a, 1 - x)) / b;
}

function betaQuantile(a, b, q) {
  let lo = 0;
  let hi = 1;
  for (let i = 0; i < 64 && hi - lo > 1e-17; i += 1) {
    const mid = (lo + hi) / 2;
    if (betaInc(a, b, mid) < q) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}

const cache = new Map();

function cached(key, compute) {
  let v = cache.get(key);
  if (v === undefined) {
    v = compute();
    if (cache.size > 50000) cache.clear();
    cache.set(key, v);
  }
  return v;
}

/** Upper bound on p from k successes in n trials: P(p <= bound) >= 1 - alpha. */
export function binomialUpper(k, n, alpha) {
  if (!(k >= 0 && k <= n) || n === 0 || k === n) return 1;
  if (k === 0) return -Math.expm1(Math.log(alpha) / n);
  return cached(`u${k},${n},${alpha}`, () => betaQuantile(k + 1, n - k, 1 - alpha));
}

/** Lower bound on p from k successes in n trials. */
export function binomialLower(k, n, alpha) {
  if (!(k > 0 && k <= n)) return 0;
  if (k === n) return Math.exp(Math.log(alpha) / n);
  return cached(`l${k},${n},${alpha}`, () => betaQuantile(k, n - k + 1, alpha));
}
