/** Types the API's options use from the layers below, for callers that only see the API (the CLI). */
export type { PortForward } from '../spec/vm-spec.js';
export type { AccelChoice } from '../vm/accel.js';
