/**
 * Exit codes of the cloudlet-overlay CLI. One table, documented in docs/cli.md;
 * scripts branch on these, so a code never changes meaning once released.
 */
export const ExitCode = {
  ok: 0,
  /** A bug or an error we did not classify. */
  internal: 1,
  /** Bad flags or arguments. */
  usage: 2,
  /** A named input (file, base, instance) does not exist or cannot be read. */
  notFound: 3,
  /** An input is corrupt or truncated (overlay, image, memory snapshot). */
  corrupt: 4,
  /** The overlay was made for another base VM. */
  baseMismatch: 5,
  /** A reconstructed target does not match the checksum recorded in the overlay. */
  verifyFailed: 6,
  /** A valid input uses something we do not support (format version, stream capability). */
  unsupported: 7,
  /** QEMU failed: did not start, refused the incoming stream, or died. */
  qemu: 8,
  /** Waited for the VM (or a peer) longer than allowed. */
  timeout: 9,
  /** A resource is busy: port in use, base in use by an instance, output exists. */
  busy: 10,
  /** A required program (qemu-img, qemu-system-x86_64) is missing from PATH. */
  missingTool: 11,
  /** Network fetch of an overlay failed. */
  network: 12,
  /** Interrupted by SIGINT/SIGTERM; outputs were removed. */
  interrupted: 130,
} as const;

export type ExitCodeName = keyof typeof ExitCode;
