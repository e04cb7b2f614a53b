import Glibc

/// An errno value with the operation that produced it.
///
/// Other modules never import Glibc; they name errno values through the constants here
/// (for example `SystemError.Code.noSpace`) so that NBD error mapping and engine errors
/// stay portable and testable.
public struct SystemError: Error, Equatable, Sendable, CustomStringConvertible {
    public struct Code: RawRepresentable, Hashable, Sendable {
        public var rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }

        public static let permission = Code(rawValue: EPERM)
        public static let noEntry = Code(rawValue: ENOENT)
        public static let interrupted = Code(rawValue: EINTR)
        public static let io = Code(rawValue: EIO)
        public static let badFile = Code(rawValue: EBADF)
        public static let tryAgain = Code(rawValue: EAGAIN)
        public static let noMemory = Code(rawValue: ENOMEM)
        public static let accessDenied = Code(rawValue: EACCES)
        public static let exists = Code(rawValue: EEXIST)
        public static let invalidArgument = Code(rawValue: EINVAL)
        public static let noSpace = Code(rawValue: ENOSPC)
        public static let readOnlyFileSystem = Code(rawValue: EROFS)
        public static let overflow = Code(rawValue: EOVERFLOW)
        public static let notSupported = Code(rawValue: EOPNOTSUPP)
        public static let shutdown = Code(rawValue: ESHUTDOWN)
        public static let wouldBlock = Code(rawValue: EWOULDBLOCK)
        public static let connectionRefused = Code(rawValue: ECONNREFUSED)
        public static let nameTooLong = Code(rawValue: ENAMETOOLONG)
        public static let timedOut = Code(rawValue: ETIMEDOUT)
        public static let brokenPipe = Code(rawValue: EPIPE)
    }

    public var code: Code
    public var operation: String

    public init(_ code: Code, _ operation: String) {
        self.code = code
        self.operation = operation
    }

    /// Captures the calling thread's current errno.
    static func current(_ operation: String) -> SystemError {
        SystemError(Code(rawValue: errno), operation)
    }

    public var message: String { String(cString: strerror(code.rawValue)) }
    public var description: String { "\(operation): \(message)" }
}
