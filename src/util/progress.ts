/**
 * Progress reporting as an interface: the library reports steps and amounts, the CLI decides
 * how (a spinner on a TTY) or whether (not at all under --json or without a TTY) to show them.
 */
export interface Progress {
  /** Starts a step; `total` (bytes) enables a percentage. */
  step(label: string, total?: number): void;
  /** Adds `n` to the current step's done amount. */
  advance(n: number): void;
  /** Ends the current step. */
  done(summary?: string): void;
  /** Ends the current step as failed. */
  fail(summary?: string): void;
}

export const silent: Progress = {
  step: () => undefined,
  advance: () => undefined,
  done: () => undefined,
  fail: () => undefined,
};

/** Wall-clock timings of named phases, in milliseconds. */
export class Timings {
  readonly phases: { [name: string]: number } = {};
  private readonly t0 = performance.now();

  async time<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const t = performance.now();
    try {
      return await fn();
    } finally {
      this.phases[name] = Math.round(performance.now() - t);
    }
  }

  total(): number {
    return Math.round(performance.now() - this.t0);
  }
}
