/**
 * Preloaded (`node --import`) by the exit-code test to provoke an unclassified error below the
 * API: the clock every operation starts with throws a plain Error. What a bug looks like.
 */
globalThis.performance.now = (): number => {
  throw new Error('injected fault: performance.now failed');
};
